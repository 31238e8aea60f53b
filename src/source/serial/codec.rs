//! One codec for every line format: [`LineCodec`] splits lines and answers
//! them; a [`LineFormat`] says what a line means and how an answer is
//! written. Each format lives in its own file (`surgard`, `contact_id`,
//! `telecare_line`) as a `LineFormat` and a codec alias.

use std::io;
use std::marker::PhantomData;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::frame::{too_long, Answer, Frame, Line, Lines};

/// A serial line format.
pub trait LineFormat: Send + Sync + 'static {
    /// The name used in configuration (`format = "…"`).
    const NAME: &'static str;
    /// Bytes that end a line.
    const TERMINATORS: &'static [u8];
    /// The longest line the format allows, without its terminator.
    const MAX_LINE: usize;

    /// What a line (without its terminator) says. Never fails: a line that
    /// cannot be read is [`Frame::Invalid`].
    fn parse(line: &[u8]) -> Frame;

    /// Writes an answer.
    fn encode(answer: &Answer, dst: &mut BytesMut);
}

/// A `tokio_util` codec for the format `F`: decodes [`Frame`]s, encodes
/// [`Answer`]s. Decoding never returns an error for bad input.
#[derive(Debug)]
pub struct LineCodec<F> {
    lines: Lines,
    format: PhantomData<F>,
}

impl<F: LineFormat> Default for LineCodec<F> {
    fn default() -> Self {
        LineCodec {
            lines: Lines::new(F::TERMINATORS, F::MAX_LINE),
            format: PhantomData,
        }
    }
}

impl<F: LineFormat> LineCodec<F> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F: LineFormat> Decoder for LineCodec<F> {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        Ok(self.lines.next_line(buf).map(|line| match line {
            Line::Text(text) => F::parse(&text),
            Line::TooLong(head) => Frame::Invalid(too_long(head, self.lines.max())),
        }))
    }

    /// At the end of input a line without its terminator is dropped: it was
    /// cut off (the port went away), and its sender, unanswered, sends it
    /// again.
    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        let frame = self.decode(buf)?;
        if frame.is_none() {
            buf.clear();
        }
        Ok(frame)
    }
}

impl<F: LineFormat> Encoder<Answer> for LineCodec<F> {
    type Error = io::Error;

    fn encode(&mut self, answer: Answer, dst: &mut BytesMut) -> io::Result<()> {
        F::encode(&answer, dst);
        Ok(())
    }
}
