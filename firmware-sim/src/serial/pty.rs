//! A pseudo-terminal standing in for a serial port, reached through a symlink the gateway's configuration
//! names.
//!
//! The simulator holds the master end; the gateway opens the slave through the symlink, as it would open
//! `/dev/ttyUSB0`. Two properties matter:
//! - The slave is in raw mode (no echo, no CR/NL translation), or every byte written to the master would
//!   come back as if the gateway had answered it. `serialport` opens the slave of a new pair itself and puts
//!   it in raw mode (`cfmakeraw`); termios belongs to the terminal, not to one descriptor, so it stays raw
//!   for whoever opens it next. The tests check that nothing echoes.
//! - The link keeps that slave descriptor open and never reads it. Otherwise the master would see a hang-up
//!   (reads fail with EIO) whenever the gateway has the port closed, for instance before it first opens it.
//!   That descriptor holds no lock (no `TIOCEXCL`, no `flock`), so the gateway can open the device
//!   exclusively. Opening the slave a second time through `serialport` would take an `flock` and lock the
//!   gateway out, which is why the link keeps the pair's own descriptor instead.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_serial::{SerialPort, SerialStream};

/// The largest read from the master at once.
const READ_CHUNK: usize = 4_096;

/// Numbers the temporary symlinks of one process apart.
static TEMPORARY: AtomicU64 = AtomicU64::new(0);

/// A pseudo-terminal pair and the symlink to its slave end.
pub struct PtyLink {
    /// The symlink the other side opens.
    link: PathBuf,
    /// The slave device (`/dev/pts/N`) the symlink points at.
    device: PathBuf,
    /// The master end, read half: what the other side wrote.
    reader: ReadHalf<SerialStream>,
    /// The master end, write half: what the other side reads.
    writer: WriteHalf<SerialStream>,
    /// The slave end, kept open and never read (see the module header).
    _slave: SerialStream,
}

impl PtyLink {
    /// Creates a pseudo-terminal pair and a symlink at `link` pointing at the slave (`/dev/pts/N`),
    /// replacing whatever is at `link` atomically (a temporary symlink beside it is renamed over it). The
    /// slave end is in raw mode (no echo, no CR/NL translation) and kept open, never read, so that the master
    /// sees no hang-up before the other side opens the port.
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// When no pseudo-terminal can be had, or the symlink cannot be made (its directory is missing, `link`
    /// is a directory, …).
    pub fn create(link: &Path) -> io::Result<PtyLink> {
        let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
        let device = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| io::Error::other("the new pseudo-terminal has no device name"))?;
        replace_symlink(&device, link)?;
        let (reader, writer) = tokio::io::split(master);
        Ok(PtyLink {
            link: link.to_path_buf(),
            device,
            reader,
            writer,
            _slave: slave,
        })
    }

    /// The symlink.
    pub fn link(&self) -> &Path {
        &self.link
    }

    /// The device the symlink points at.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Writes `bytes` to the master, for the other side to read. Waits while the terminal's buffer is full
    /// (the other side is not reading).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Bytes the other side wrote, waiting at most `timeout` for the first byte, then taking whatever else
    /// is already available; empty when nothing came in time.
    ///
    /// # Errors
    /// When reading the master fails; `UnexpectedEof` when it reached its end (which the slave end held open
    /// prevents).
    pub async fn read_some(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; READ_CHUNK];
        let n = match tokio::time::timeout(timeout, self.reader.read(&mut bytes)).await {
            Err(_) => return Ok(Vec::new()),
            Ok(read) => read?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the pseudo-terminal was closed",
            ));
        }
        bytes.truncate(n);
        let mut more = vec![0; READ_CHUNK];
        // A zero timeout still polls the read once: it takes what is there without waiting.
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(Duration::ZERO, self.reader.read(&mut more)).await
        {
            bytes.extend_from_slice(&more[..n]);
        }
        Ok(bytes)
    }

    /// "Unplugs" the port: closes both ends, so the other side's reads end (EOF or EIO). The symlink is left
    /// in place, dangling.
    pub fn close(self) {
        drop(self);
    }

    /// Both halves of the master, to read and write at once.
    pub(crate) fn halves(&mut self) -> (&mut ReadHalf<SerialStream>, &mut WriteHalf<SerialStream>) {
        (&mut self.reader, &mut self.writer)
    }
}

impl std::fmt::Debug for PtyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtyLink")
            .field("link", &self.link)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Points `link` at `target`, replacing whatever is there in one rename.
fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let name = link.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", link.display()),
        )
    })?;
    let mut temporary = OsString::from(".");
    temporary.push(name);
    temporary.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        TEMPORARY.fetch_add(1, Ordering::Relaxed)
    ));
    let temporary = link.with_file_name(temporary);
    // A leftover of a crashed run with the same process id would make symlink() fail.
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(target, &temporary)?;
    std::fs::rename(&temporary, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}
