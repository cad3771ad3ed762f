//! The log's lines: one event per line, tab-separated, written with one `write(2)`.
//!
//! Every line is `seq TAB tid TAB kind TAB name`, then `key=value` fields, each after a
//! tab. `seq` is a process-wide sequence number, `tid` the kernel thread id. Kinds:
//!
//! - `call`: `via=export|proc|slot depth=N args=A0,A1,A2,A3,A4,A5` (the six integer
//!   argument registers in hex; a function with fewer arguments leaves the rest garbage).
//! - `ret`: `call=SEQ depth=N rax=0x..` and, for driver functions (`via` export or proc),
//!   `result=N`: the `CUresult` (the low 32 bits of `rax`) in decimal.
//! - `proc`: a `cuGetProcAddress` answer: the requested symbol as name, `version= flags= rc=
//!   real= resolved= stub=` (`resolved` is the driver's own name for the pointer, `-` when
//!   it has none).
//! - `table`: a `cuGetExportTable` answer: the UUID as name, `rc= real= copy= slots= code=
//!   how=` (how the length was decided, see `table_shape.rs`).
//! - `info` and `error`: the tracer's own messages, a topic as name and free text.

use std::fmt::{self, Write};

/// How long a line may get; longer ones are cut and end in `...`.
pub(crate) const LINE_CAPACITY: usize = 768;

/// A line being formatted, in a fixed buffer: logging never allocates.
pub(crate) struct Line {
    seq: u64,
    buf: [u8; LINE_CAPACITY],
    len: usize,
    cut: bool,
}

impl Line {
    /// Starts a line with its common columns.
    pub(crate) fn new(seq: u64, tid: u32, kind: &str, name: &str) -> Line {
        let mut line = Line { seq, buf: [0; LINE_CAPACITY], len: 0, cut: false };
        let _ = write!(line, "{seq}\t{tid}\t{kind}\t");
        line.push_clean(name);
        line
    }

    /// The line's sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends a `key=value` field after a tab.
    pub(crate) fn field(mut self, key: &str, value: impl fmt::Display) -> Line {
        let _ = write!(self, "\t{key}=");
        let mut clean = Clean(&mut self);
        let _ = write!(clean, "{value}");
        self
    }

    /// Appends the six argument registers as one `args=` field.
    pub(crate) fn args(self, regs: &[u64; 6]) -> Line {
        self.field("args", HexList(regs))
    }

    /// The finished line, newline included.
    pub(crate) fn finish(&mut self) -> &[u8] {
        const CUT: &[u8] = b"...\n";
        if self.cut || self.len + 1 > LINE_CAPACITY {
            let at = self.len.min(LINE_CAPACITY - CUT.len());
            self.buf[at..at + CUT.len()].copy_from_slice(CUT);
            self.len = at + CUT.len();
        } else {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        &self.buf[..self.len]
    }

    /// Appends text with tabs, newlines and other control characters replaced by `?`, so
    /// that names coming from the program cannot break the line structure.
    fn push_clean(&mut self, text: &str) {
        let _ = Clean(self).write_str(text);
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // One byte stays free for the newline.
        let room = LINE_CAPACITY - 1 - self.len;
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            self.cut = true;
        }
        Ok(())
    }
}

/// A writer that replaces control characters before they reach the line.
struct Clean<'a>(&'a mut Line);

impl Write for Clean<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut parts = s.split(char::is_control);
        if let Some(first) = parts.next() {
            self.0.write_str(first)?;
        }
        // Each further part followed one control character.
        for part in parts {
            self.0.write_str("?")?;
            self.0.write_str(part)?;
        }
        Ok(())
    }
}

/// Registers in hex, comma-separated.
struct HexList<'a>(&'a [u64; 6]);

impl fmt::Display for HexList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            write!(f, "{v:#x}")?;
        }
        Ok(())
    }
}

/// A CUDA UUID (`CUuuid`, 16 bytes) shown as `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`: the
/// bytes in memory order, upper-case hex, grouped 4-2-2-2-6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Uuid(pub [u8; 16]);

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('{')?;
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_char('-')?;
            }
            write!(f, "{b:02X}")?;
        }
        f.write_char('}')
    }
}

/// The traced name of export-table slot `slot` of table `uuid`, e.g. `{6BD5..}[3]`.
pub(crate) fn slot_name(uuid: &Uuid, slot: usize) -> String {
    format!("{uuid}[{slot}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(mut line: Line) -> String {
        String::from_utf8(line.finish().to_vec()).unwrap()
    }

    #[test]
    fn uuid_prints_bytes_in_memory_order_grouped_4_2_2_2_6() {
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8) * 0x11;
        }
        bytes[15] = 0xab;
        assert_eq!(Uuid(bytes).to_string(), "{00112233-4455-6677-8899-AABBCCDDEEAB}");
        assert_eq!(slot_name(&Uuid([0; 16]), 3), "{00000000-0000-0000-0000-000000000000}[3]");
    }

    #[test]
    fn call_and_ret_lines_are_tab_separated_fields() {
        let regs = [0x1, 0x20, 0, 0xdead_beef, u64::MAX, 7];
        let call = Line::new(12, 4242, "call", "cuMemAlloc_v2").field("via", "export").field("depth", 0).args(&regs);
        assert_eq!(
            text(call),
            "12\t4242\tcall\tcuMemAlloc_v2\tvia=export\tdepth=0\targs=0x1,0x20,0x0,0xdeadbeef,0xffffffffffffffff,0x7\n"
        );
        let ret = Line::new(13, 4242, "ret", "cuMemAlloc_v2").field("call", 12).field("rax", format_args!("{:#x}", 2));
        assert_eq!(text(ret), "13\t4242\tret\tcuMemAlloc_v2\tcall=12\trax=0x2\n");
    }

    #[test]
    fn control_characters_in_names_and_values_become_question_marks() {
        let line = Line::new(1, 2, "proc", "cu\tEvil\nName").field("resolved", "a\tb");
        assert_eq!(text(line), "1\t2\tproc\tcu?Evil?Name\tresolved=a?b\n");
    }

    #[test]
    fn long_lines_are_cut_and_marked() {
        let long = "x".repeat(2 * LINE_CAPACITY);
        let mut line = Line::new(1, 2, "info", "topic").field("text", &long);
        let bytes = line.finish();
        assert_eq!(bytes.len(), LINE_CAPACITY);
        assert!(bytes.ends_with(b"xxx...\n"));
        assert!(bytes.starts_with(b"1\t2\tinfo\ttopic\ttext=xxx"));
    }
}
