//! Metrics as JSON lines in the run directory: one record every N steps and one per epoch,
//! readable back for plots and cut back to a checkpoint on resume.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricRecord {
    /// Training progress every `run.log_every_steps` steps.
    Step {
        /// 0-based epoch.
        epoch: usize,
        /// Optimiser steps since the start (after this step).
        global_step: usize,
        /// Mean training loss over the steps since the previous record.
        loss: f64,
        /// Learning rate of the new layers.
        lr: f64,
        /// Training throughput over those steps.
        images_per_sec: f64,
        /// CUDA: bytes held by live allocations in the device's memory pool now, GiB (absent on
        /// other devices): a growing value across records is a leak.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_memory_gib: Option<f64>,
    },
    /// The end of an epoch, with the evaluation when one ran.
    Epoch {
        /// 0-based epoch.
        epoch: usize,
        /// Optimiser steps since the start.
        global_step: usize,
        /// Mean training loss of the epoch.
        train_loss: f64,
        /// Learning rate of the new layers during the epoch.
        lr: f64,
        /// Training throughput of the epoch.
        images_per_sec: f64,
        /// Test top-1 accuracy, in [0, 1], when evaluated.
        test_top1: Option<f64>,
        /// Test top-1 of logits + mid-level logits, with a mid-level head.
        test_top1_combined: Option<f64>,
        /// Mean test cross-entropy, when evaluated.
        test_loss: Option<f64>,
    },
}

impl MetricRecord {
    /// The optimiser step the record belongs to.
    pub fn global_step(&self) -> usize {
        match self {
            Self::Step { global_step, .. } | Self::Epoch { global_step, .. } => *global_step,
        }
    }
}

/// Appends records to `metrics.jsonl`, one flushed line each.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending; with `keep_up_to_step`, first drops the records of steps
    /// after it (those a resumed run will produce again).
    pub fn open(path: &Path, keep_up_to_step: Option<usize>) -> Result<Self, TrainError> {
        if let Some(step) = keep_up_to_step {
            if path.exists() {
                let kept: Vec<MetricRecord> = read_metrics(path)?
                    .into_iter()
                    .filter(|record| record.global_step() <= step)
                    .collect();
                let mut text = String::new();
                for record in &kept {
                    text.push_str(&to_line(path, record)?);
                }
                crate::rundir::write_atomic(path, text.as_bytes())?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| TrainError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &MetricRecord) -> Result<(), TrainError> {
        let line = to_line(&self.path, record)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| TrainError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Makes the records written so far durable (called with each checkpoint).
    pub fn sync(&self) -> Result<(), TrainError> {
        self.file.sync_data().map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn to_line(path: &Path, record: &MetricRecord) -> Result<String, TrainError> {
    let mut line = serde_json::to_string(record).map_err(|source| TrainError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    line.push('\n');
    Ok(line)
}

/// Reads every record of a metrics file. A torn last line (a crash mid-write) is ignored; a bad
/// line elsewhere is an error naming its number.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>, TrainError> {
    let file = File::open(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let count = lines.len();
    let mut records = Vec::with_capacity(count);
    for (number, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if number + 1 == count => break,
            Err(source) => {
                return Err(TrainError::InvalidSetting(format!(
                    "{} line {}: {source}",
                    path.display(),
                    number + 1
                )))
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn step(global_step: usize) -> MetricRecord {
        MetricRecord::Step {
            epoch: 0,
            global_step,
            loss: 1.5,
            lr: 0.01,
            images_per_sec: 100.0,
            device_memory_gib: None,
        }
    }

    #[test]
    fn records_round_trip_and_resume_cuts_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::open(&path, None).unwrap();
        let epoch = MetricRecord::Epoch {
            epoch: 0,
            global_step: 20,
            train_loss: 2.0,
            lr: 0.01,
            images_per_sec: 90.0,
            test_top1: Some(0.5),
            test_top1_combined: None,
            test_loss: Some(1.2),
        };
        for record in [step(10), epoch.clone(), step(30)] {
            writer.write(&record).unwrap();
        }
        writer.sync().unwrap();
        assert_eq!(
            read_metrics(&path).unwrap(),
            vec![step(10), epoch.clone(), step(30)]
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.lines().nth(1).unwrap().contains("\"kind\":\"epoch\""));

        let mut writer = MetricsWriter::open(&path, Some(20)).unwrap();
        writer.write(&step(25)).unwrap();
        assert_eq!(
            read_metrics(&path).unwrap(),
            vec![step(10), epoch, step(25)]
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored_a_bad_middle_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let good = serde_json::to_string(&step(1)).unwrap();
        fs::write(&path, format!("{good}\n{{\"kind\":\"st")).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), vec![step(1)]);
        fs::write(&path, format!("garbage\n{good}\n")).unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
