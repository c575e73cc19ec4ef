//! The kernel's struct layout the containment programs need, read from
//! the running kernel's BTF (a hand-rolled "CO-RE" for the few fields the
//! cgroup guard reads), and a process's start time (what tells the node's
//! own process from one that got its pid). Imports nothing of the node's.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    #[error("reading kernel BTF {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no field `{0}`")]
    NoField(String),
}

/// Byte offsets of the kernel struct fields the cgroup guard reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLayout {
    pub inode_i_sb: u64,
    pub inode_i_private: u64,
    pub sb_s_magic: u64,
    pub kn_parent: u64,
    pub kn_id: u64,
    /// `task_struct.thread_info.status` (x86: TS_COMPAT there marks a
    /// syscall made through the 32-bit entry), where the kernel has it.
    pub task_ti_status: Option<u64>,
    /// `task_struct.group_leader` and `.start_boottime`: the node's own
    /// process is told by pid *and* start time.
    pub task_start: Option<(u64, u64)>,
}

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

impl KernelLayout {
    pub fn from_sys_fs() -> Result<Self, ContainError> {
        let path = Path::new(VMLINUX_BTF);
        let data = std::fs::read(path).map_err(|source| ContainError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_btf(&data)
    }

    pub fn from_btf(data: &[u8]) -> Result<Self, ContainError> {
        let btf = Btf::parse(data)?;
        let off = |st: &str, fields: &[&str]| -> Result<u64, ContainError> {
            fields
                .iter()
                .find_map(|f| btf.member_offset(st, f))
                .ok_or_else(|| ContainError::NoField(format!("{st}.{}", fields.join("|"))))
        };
        Ok(Self {
            inode_i_sb: off("inode", &["i_sb"])?,
            inode_i_private: off("inode", &["i_private"])?,
            sb_s_magic: off("super_block", &["s_magic"])?,
            // Renamed `__parent` in 6.15 (RCU-protected).
            kn_parent: off("kernfs_node", &["__parent", "parent"])?,
            kn_id: off("kernfs_node", &["id"])?,
            task_ti_status: btf
                .member_offset("task_struct", "thread_info")
                .zip(btf.member_offset("thread_info", "status"))
                .map(|(a, b)| a + b),
            task_start: btf.member_offset("task_struct", "group_leader").zip(
                btf.member_offset("task_struct", "start_boottime")
                    .or_else(|| btf.member_offset("task_struct", "real_start_time")),
            ),
        })
    }
}

/// The BTF type id of kernel function `name` (e.g. `bpf_lsm_socket_create`,
/// what an LSM program's `attach_btf_id` names).
pub fn vmlinux_func_id(name: &str) -> Result<u32, ContainError> {
    let path = Path::new(VMLINUX_BTF);
    let data = std::fs::read(path).map_err(|source| ContainError::Read {
        path: path.to_owned(),
        source,
    })?;
    let btf = Btf::parse(&data)?;
    btf.types
        .iter()
        .position(|t| t.kind == KIND_FUNC && btf.name(t.name) == name.as_bytes())
        .map(|i| i as u32)
        .ok_or_else(|| ContainError::NoField(name.to_owned()))
}

const KIND_FUNC: u32 = 12;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset within the struct.
    bits: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// Referenced type (typedef, const...).
    ty: u32,
    members: Vec<Member>,
}

/// The part of the BTF format needed to find struct member offsets.
struct Btf<'a> {
    strings: &'a [u8],
    /// Index = type id (0 = void).
    types: Vec<Type>,
    by_name: HashMap<&'a [u8], Vec<u32>>,
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, ContainError> {
    d.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(ContainError::Malformed("truncated"))
}

impl<'a> Btf<'a> {
    fn parse(d: &'a [u8]) -> Result<Self, ContainError> {
        if d.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(ContainError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let types_data = d
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(ContainError::Malformed("type section out of bounds"))?;
        let strings = d
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(ContainError::Malformed("string section out of bounds"))?;
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_data.len() {
            let name = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let ty = u32_at(types_data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw = u32_at(types_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(types_data, m)?,
                            ty: u32_at(types_data, m + 4)?,
                            bits: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                _ => 0,
            };
            at += extra;
            types.push(Type {
                kind,
                name,
                ty,
                members,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let n = btf.name(t.name);
                btf.by_name.entry(n).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        &s[..end]
    }

    /// Byte offset of `field` in `struct st`, looking into anonymous
    /// structs and unions.
    fn member_offset(&self, st: &str, field: &str) -> Option<u64> {
        self.by_name
            .get(st.as_bytes())?
            .iter()
            .find_map(|id| self.find(*id, field.as_bytes(), 0))
            .map(|bits| bits / 8)
    }

    fn find(&self, id: u32, field: &[u8], depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            if m.name != 0 {
                if self.name(m.name) == field {
                    return Some(u64::from(m.bits));
                }
                continue;
            }
            let inner = self.resolve(m.ty);
            if let Some(o) = self.find(inner, field, depth + 1) {
                return Some(o + u64::from(m.bits));
            }
        }
        None
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }
}

/// Field 22 of /proc/PID/stat: the start time, clock ticks after boot.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_layout_is_found() {
        // Every supported host has BTF (the LSM programs need it too).
        let l = KernelLayout::from_sys_fs().expect("kernel BTF");
        assert!(
            l.inode_i_sb > 0 && l.inode_i_private > l.inode_i_sb,
            "{l:?}"
        );
        assert!(l.kn_id > l.kn_parent, "{l:?}");
        // What tells the node's own process from one that got its pid.
        assert!(l.task_start.is_some(), "{l:?}");
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KernelLayout::from_btf(b"").is_err());
        assert!(KernelLayout::from_btf(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 255, 255]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 12, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0]);
        hdr.extend_from_slice(&[1, 0, 0, 0, 5, 0, 0, 4]);
        assert!(KernelLayout::from_btf(&hdr).is_err());
    }
}
