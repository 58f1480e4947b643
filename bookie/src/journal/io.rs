//! The journal's disk seam: write a batch at an offset and make it durable. Two backends: io_uring
//! (the write and a linked fdatasync go to the kernel in one submission) and plain `pwrite` +
//! `fdatasync` for kernels or sandboxes that forbid io_uring.

use crate::config::JournalIoKind;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub trait JournalIo: Send {
    /// Backend name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Writes all of `buf` at `offset`, then, when `sync`, fdatasyncs the file. Returns only once
    /// both are done; an error means nothing about the batch is known to be durable.
    fn write_at(&mut self, file: &File, buf: &[u8], offset: u64, sync: bool) -> io::Result<()>;
}

/// Opens the configured backend. `Auto` picks io_uring (one submission for write + fdatasync)
/// when the kernel allows it and the journal syncs, plain I/O otherwise: without syncs, a plain
/// buffered write is cheaper than a round trip through io_uring's workers (measured).
pub fn open(kind: JournalIoKind, sync: bool) -> io::Result<Box<dyn JournalIo>> {
    match kind {
        JournalIoKind::Plain => Ok(Box::new(PlainIo)),
        JournalIoKind::Auto if !sync => Ok(Box::new(PlainIo)),
        JournalIoKind::IoUring => Ok(Box::new(UringIo::new()?)),
        JournalIoKind::Auto => match UringIo::new() {
            Ok(u) => Ok(Box::new(u)),
            Err(e) => {
                tracing::info!(error = %e, "io_uring unavailable; journal uses plain file I/O");
                Ok(Box::new(PlainIo))
            }
        },
    }
}

pub struct PlainIo;

impl JournalIo for PlainIo {
    fn name(&self) -> &'static str {
        "plain"
    }

    fn write_at(&mut self, file: &File, buf: &[u8], offset: u64, sync: bool) -> io::Result<()> {
        file.write_all_at(buf, offset)?;
        if sync {
            file.sync_data()?;
        }
        Ok(())
    }
}

pub struct UringIo {
    ring: io_uring::IoUring,
}

const WRITE: u64 = 1;
const FSYNC: u64 = 2;

impl UringIo {
    pub fn new() -> io::Result<Self> {
        let ring = io_uring::IoUring::new(8)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(io_uring::opcode::Write::CODE)
            || !probe.is_supported(io_uring::opcode::Fsync::CODE)
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks write or fsync",
            ));
        }
        Ok(Self { ring })
    }
}

impl UringIo {
    /// Submits and waits for `n` completions. A signal (EINTR) only interrupts the wait, never
    /// the operations, so it is retried; on any other error the operations may still be running
    /// in the kernel and reading `buf`, so this keeps waiting (bounded) for them before giving up.
    fn wait(&mut self, n: usize) -> io::Result<()> {
        let mut last = None;
        for _ in 0..1000 {
            match self.ring.submit_and_wait(n) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            if self.ring.completion().len() >= n {
                return Ok(());
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("io_uring wait kept failing")))
    }
}

impl JournalIo for UringIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn write_at(&mut self, file: &File, buf: &[u8], offset: u64, sync: bool) -> io::Result<()> {
        use io_uring::{opcode, squeue, types};
        let fd = types::Fd(file.as_raw_fd());
        let mut done = 0usize;
        let mut synced = !sync;
        while done < buf.len() || !synced {
            let rest = &buf[done..];
            let mut ops = Vec::with_capacity(2);
            if !rest.is_empty() {
                let mut w = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(offset + done as u64)
                    .build()
                    .user_data(WRITE);
                if sync {
                    // A short write breaks the link: the fsync then completes with ECANCELED and
                    // the loop writes the rest before syncing.
                    w = w.flags(squeue::Flags::IO_LINK);
                }
                ops.push(w);
            }
            if sync {
                ops.push(
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(FSYNC),
                );
            }
            // SAFETY: the entries point into `buf` and at `file`'s fd, both of which outlive the
            // operations: we wait below for every submitted entry to complete before returning.
            unsafe {
                let mut sq = self.ring.submission();
                for op in &ops {
                    sq.push(op)
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            let mut seen = 0;
            let mut failure = None;
            self.wait(ops.len())?;
            while seen < ops.len() {
                let Some(cqe) = self.ring.completion().next() else {
                    self.wait(1)?;
                    continue;
                };
                seen += 1;
                let res = cqe.result();
                match cqe.user_data() {
                    WRITE if res < 0 => failure = Some(io::Error::from_raw_os_error(-res)),
                    WRITE if res == 0 => {
                        failure = Some(io::Error::new(io::ErrorKind::WriteZero, "zero write"))
                    }
                    WRITE => done += res as usize,
                    _ if res == -libc::ECANCELED => {}
                    _ if res < 0 => failure = Some(io::Error::from_raw_os_error(-res)),
                    _ => synced = done == buf.len(),
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(io: &mut dyn JournalIo) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("j"))
            .unwrap();
        io.write_at(&f, b"hello", 0, true).unwrap();
        io.write_at(&f, b"world", 5, false).unwrap();
        io.write_at(&f, b"", 10, true).unwrap();
        let mut got = vec![0; 10];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"helloworld");
    }

    #[test]
    fn plain_writes_and_syncs() {
        check(&mut PlainIo);
    }

    #[test]
    fn uring_writes_and_syncs_when_available() {
        match UringIo::new() {
            Ok(mut u) => check(&mut u),
            Err(e) => eprintln!("skipped: io_uring unavailable here: {e}"),
        }
    }
}
