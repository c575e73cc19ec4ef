//! WebSocket frame headers (RFC 6455 section 5.2), for the masker's
//! framing and the client-to-server message judge.
use super::ScanError;

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }

    pub fn is_control(&self) -> bool {
        self.opcode >= 8
    }
}

/// The header at the start of `buf`, once it is all there.
pub fn parse_header(buf: &[u8], limit: usize) -> Result<Option<FrameHeader>, ScanError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        return Err(ScanError::Framing(
            "WebSocket reserved bits RSV2/RSV3 set".into(),
        ));
    }
    let opcode = b0 & 0x0f;
    if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        return Err(ScanError::Framing("unknown WebSocket opcode".into()));
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let payload_len =
        usize::try_from(len)
            .ok()
            .filter(|l| *l <= limit)
            .ok_or(ScanError::TooLarge {
                what: "WebSocket frame",
                limit,
            })?;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_length_form() {
        assert_eq!(parse_header(&[0x81], 1 << 20).unwrap(), None);
        let h = parse_header(&[0x81, 0x05, b'h'], 1 << 20).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, 1, 2, 5)
        );
        let h = parse_header(&[0x01, 0xfe, 0x01, 0x00, 1, 2, 3, 4], 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.payload_len, h.mask),
            (false, 256, Some([1, 2, 3, 4]))
        );
        let mut big = vec![0x82, 0x7f];
        big.extend(70_000u64.to_be_bytes());
        assert_eq!(parse_header(&big, 1 << 20).unwrap().unwrap().header_len, 10);
        assert!(parse_header(&big, 1000).is_err());
        assert!(parse_header(&[0xb1, 0x00], 1 << 20).is_err(), "RSV2");
        assert!(parse_header(&[0x83, 0x00], 1 << 20).is_err(), "opcode 3");
    }
}
