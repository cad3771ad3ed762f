//! JIT linking on the test double: it links PTX only, by joining the inputs' texts into
//! one module image (which it can load); it resolves nothing, so a missing function is not
//! found here as the driver finds it.

use super::*;

/// A simulated link: the PTX texts added so far, and its log.
#[derive(Debug, Default)]
pub struct SimLink {
    ptx: String,
    inputs: usize,
    error_log: String,
}

impl SimGpu {
    /// Adds one input to a link: the double links PTX only (text it can load), so any other
    /// input type is `CUDA_ERROR_NOT_SUPPORTED`.
    pub(super) fn add_to_link(link: &mut SimLink, input_type: u32, data: &[u8], name: &CStr) -> CuResult<()> {
        const PTX: u32 = 1;
        if input_type != PTX {
            link.error_log = format!("{}: the test double links PTX only", name.to_string_lossy());
            return Err(CuError::NOT_SUPPORTED);
        }
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        let Ok(text) = std::str::from_utf8(&data[..end]) else {
            link.error_log = format!("{}: not UTF-8 PTX", name.to_string_lossy());
            return Err(CuError::INVALID_IMAGE);
        };
        if let Err(e) = parse_ptx(text) {
            link.error_log = format!("{}: PTX the double cannot read", name.to_string_lossy());
            return Err(e);
        }
        link.ptx.push_str(text);
        link.ptx.push('\n');
        link.inputs += 1;
        Ok(())
    }

    /// The linked image: the inputs' PTX, one text (NUL-terminated, as a module image).
    pub(super) fn complete_link(link: &mut SimLink) -> CuResult<Vec<u8>> {
        if link.inputs == 0 {
            link.error_log = "nothing to link".into();
            return Err(CuError::INVALID_VALUE);
        }
        let mut image = link.ptx.clone().into_bytes();
        image.push(0);
        Ok(image)
    }

    /// The link's logs (info, error).
    pub(super) fn link_log_texts(link: &SimLink) -> (String, String) {
        (format!("test double: {} PTX input(s)", link.inputs), link.error_log.clone())
    }
}
