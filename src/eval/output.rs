//! The sweep's output files, opened for writing before any work: a path
//! that cannot be written fails at start-up, naming its flag, instead of
//! after the run with the results lost.

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use super::EvalArgs;

/// A file opened for writing at start-up and written once at the end. Its
/// old contents stay until then (nothing is truncated at opening: a failed
/// run keeps the previous results, and `--questions-in` may read the file
/// `--questions-out` rewrites); a file the run created and never wrote is
/// removed again when the run ends in an error (a run killed by a signal
/// leaves it, empty).
#[derive(Debug)]
pub(super) struct OutputFile {
    flag: &'static str,
    path: PathBuf,
    file: File,
    created: bool,
    written: bool,
}

impl OutputFile {
    /// Opens `path` for writing, the error naming `flag`, the path and the
    /// reason the OS gave.
    pub(super) fn open(flag: &'static str, path: &Path) -> anyhow::Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| anyhow::anyhow!("{flag} {}: cannot write there: {e}", path.display()))?;
        Ok(Self { flag, path: path.to_path_buf(), file, created: !existed, written: false })
    }

    /// Replaces the file's contents with `bytes`.
    pub(super) fn write(mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let err = |e: std::io::Error| anyhow::anyhow!("{} {}: {e}", self.flag, self.path.display());
        // /dev/stdout, /dev/null and pipes can be neither truncated nor rewound.
        if self.file.metadata().map_err(err)?.is_file() {
            self.file.set_len(0).map_err(err)?;
            self.file.rewind().map_err(err)?;
        }
        self.file.write_all(bytes).map_err(err)?;
        self.file.flush().map_err(err)?;
        self.written = true;
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            // Best effort: an empty file left behind is only clutter.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `--plot` and `--questions-out`, each opened if given.
#[derive(Debug)]
pub(super) struct SweepOutputs {
    pub(super) plot: Option<OutputFile>,
    pub(super) questions: Option<OutputFile>,
}

impl SweepOutputs {
    pub(super) fn open(args: &EvalArgs) -> anyhow::Result<Self> {
        Ok(Self {
            plot: args.plot.as_deref().map(|p| OutputFile::open("--plot", p)).transpose()?,
            questions: args
                .questions_out
                .as_deref()
                .map(|p| OutputFile::open("--questions-out", p))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_cannot_be_written_is_an_error_naming_the_flag_the_path_and_the_reason() {
        let e =
            OutputFile::open("--plot", Path::new("/nonexistent/dir/x.svg")).expect_err("no such directory");
        let e = e.to_string();
        assert!(e.starts_with("--plot /nonexistent/dir/x.svg: cannot write there: "), "{e}");
        assert!(e.contains("No such file or directory"), "{e}");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let e = OutputFile::open("--questions-out", dir.path()).expect_err("a directory").to_string();
        assert!(e.starts_with("--questions-out ") && e.contains("cannot write there"), "{e}");
    }

    #[test]
    fn a_file_keeps_its_old_contents_until_written_and_a_new_one_never_written_is_removed() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let old = dir.path().join("old.jsonl");
        std::fs::write(&old, "a much longer previous content\n").expect("written");
        let f = OutputFile::open("--questions-out", &old).expect("opened");
        assert_eq!(std::fs::read_to_string(&old).expect("read"), "a much longer previous content\n");
        f.write(b"new\n").expect("written");
        assert_eq!(std::fs::read_to_string(&old).expect("read"), "new\n");
        let fresh = dir.path().join("fresh.svg");
        drop(OutputFile::open("--plot", &fresh).expect("opened"));
        assert!(!fresh.exists(), "a run that failed leaves no empty file behind");
        drop(OutputFile::open("--questions-out", &old).expect("opened"));
        assert!(old.exists(), "a file that was there stays");
    }
}
