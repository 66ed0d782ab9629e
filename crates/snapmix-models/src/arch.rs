//! The five torchvision ResNet depths and what distinguishes them (block kind, blocks per stage).

use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

/// A ResNet depth in torchvision's v1.5 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// ResNet-18: basic blocks `[2, 2, 2, 2]`.
    ResNet18,
    /// ResNet-34: basic blocks `[3, 4, 6, 3]`.
    ResNet34,
    /// ResNet-50: bottlenecks `[3, 4, 6, 3]`.
    ResNet50,
    /// ResNet-101: bottlenecks `[3, 4, 23, 3]`.
    ResNet101,
    /// ResNet-152: bottlenecks `[3, 8, 36, 3]`.
    ResNet152,
}

/// The residual block kind of a depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convs, expansion 1 (ResNet-18/34).
    Basic,
    /// 1x1 -> 3x3 (strided) -> 1x1, expansion 4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block over its base width (1 or 4).
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

impl Arch {
    /// Every depth, shallowest first.
    pub const ALL: [Arch; 5] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
    ];

    /// The lowercase torchvision name, e.g. `resnet50`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
        }
    }

    /// The block kind.
    pub fn block(self) -> BlockKind {
        match self {
            Arch::ResNet18 | Arch::ResNet34 => BlockKind::Basic,
            _ => BlockKind::Bottleneck,
        }
    }

    /// Blocks in `layer1..layer4`.
    pub fn blocks_per_stage(self) -> [usize; 4] {
        match self {
            Arch::ResNet18 => [2, 2, 2, 2],
            Arch::ResNet34 | Arch::ResNet50 => [3, 4, 6, 3],
            Arch::ResNet101 => [3, 4, 23, 3],
            Arch::ResNet152 => [3, 8, 36, 3],
        }
    }

    /// The Hugging Face hub repository with this depth's torchvision ImageNet weights, in
    /// timm's naming (which equals torchvision's for ResNets): e.g. `timm/resnet50.tv_in1k`.
    pub fn hub_repo(self) -> String {
        format!("timm/{}.tv_in1k", self.name())
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = ModelError;

    /// Parses `resnet50`, `ResNet-50` or `resnet_50` (case and separators ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key: String = s
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .collect::<String>()
            .to_ascii_lowercase();
        Arch::ALL
            .into_iter()
            .find(|arch| arch.name() == key)
            .ok_or_else(|| ModelError::UnknownArch(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!("resnet18".parse::<Arch>().unwrap(), Arch::ResNet18);
        assert_eq!("ResNet-152".parse::<Arch>().unwrap(), Arch::ResNet152);
        assert_eq!("resnet_50".parse::<Arch>().unwrap(), Arch::ResNet50);
        let err = "resnet19".parse::<Arch>().unwrap_err();
        assert!(err.to_string().contains("resnet19"), "{err}");
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        }
    }
}
