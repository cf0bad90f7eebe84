//! Buffer pool placement on the NUMA node of the NIC that moves it (feature `numa`), from sysfs
//! and the `mbind(2)` system call: no library to link or load.
//!
//! The kernel gives each RDMA device's PCI function a node in
//! `/sys/class/infiniband/DEV/device/numa_node` (`-1` when the platform reports no locality);
//! the machine's nodes are listed in `/sys/devices/system/node/online`. The pool's pages are
//! bound to the NIC's node, and migrated there, before the pool is registered with the NIC
//! (registration pins them where they are). Soft-RoCE devices (no PCI function) and
//! single-node machines have no locality to act on: nothing happens.

/// `MPOL_BIND` from `<linux/mempolicy.h>`: allocate only on the given nodes.
#[cfg(feature = "numa")]
const MPOL_BIND: libc::c_int = 2;
/// `MPOL_MF_MOVE`: migrate pages of this mapping that are already elsewhere.
#[cfg(feature = "numa")]
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;

/// The node numbers in a sysfs list such as `0-3,8,10-11`.
#[cfg_attr(not(feature = "numa"), allow(dead_code))]
fn parse_node_list(s: &str) -> Result<Vec<usize>, String> {
    let mut nodes = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad node list {s:?}");
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if b < a {
            return Err(bad());
        }
        nodes.extend(a..=b);
    }
    Ok(nodes)
}

/// Binds `len` bytes at `base` (a whole buffer pool, page-aligned) to the NUMA node local to
/// RDMA device `device`, moving pages already there. Returns the node, or why not.
///
/// # Safety
/// `base..base+len` is mapped, and no I/O writes into it during the call (pages may move).
#[cfg(feature = "numa")]
pub(crate) unsafe fn place_for_device(base: *const u8, len: usize, device: &str) -> Result<String, String> {
    const ONLINE: &str = "/sys/devices/system/node/online";
    let online = std::fs::read_to_string(ONLINE).map_err(|e| format!("{ONLINE}: {e}"))?;
    let numa_nodes = parse_node_list(&online)?.len();
    if numa_nodes <= 1 {
        return Err(format!("{numa_nodes} NUMA node(s): nothing to place"));
    }
    let path = std::path::Path::new("/sys/class/infiniband").join(device).join("device/numa_node");
    let node = std::fs::read_to_string(&path)
        .map_err(|e| format!("{device} has no NUMA locality ({}: {e}; soft-RoCE has none)", path.display()))?;
    let node: i64 = node.trim().parse().map_err(|_| format!("{}: not a node number: {node:?}", path.display()))?;
    let Ok(node) = usize::try_from(node) else {
        return Err(format!("{device} has no NUMA locality (the platform reports node {node})"));
    };
    // SAFETY: the caller's contract.
    unsafe { bind_to_node(base, len, node) }?;
    Ok(node.to_string())
}

/// Binds (and migrates) the pages of `base..base+len` to NUMA node `node` with `mbind(2)`.
///
/// # Safety
/// `base..base+len` is mapped and page-aligned, and no I/O writes into it during the call.
#[cfg(feature = "numa")]
unsafe fn bind_to_node(base: *const u8, len: usize, node: usize) -> Result<(), String> {
    let bits = libc::c_ulong::BITS as usize;
    let mut mask = vec![0 as libc::c_ulong; node / bits + 1];
    mask[node / bits] |= 1 << (node % bits);
    // The kernel reads `maxnode - 1` bits of the mask.
    let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
    // SAFETY: the caller keeps the range mapped and idle for the call; the mask holds `maxnode
    // - 1` bits; mbind changes only the policy and placement of these pages, not their contents.
    let rc = unsafe { libc::syscall(libc::SYS_mbind, base, len, MPOL_BIND, mask.as_ptr(), maxnode, MPOL_MF_MOVE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("binding the pool to NUMA node {node} (mbind): {e}"));
    }
    Ok(())
}

/// Without the `numa` feature pools stay where the kernel put them.
///
/// # Safety
/// None needed; the signature matches the `numa` version.
#[cfg(not(feature = "numa"))]
pub(crate) unsafe fn place_for_device(_: *const u8, _: usize, _: &str) -> Result<String, String> {
    Err("built without the `numa` feature".into())
}

#[cfg(test)]
mod placement_tests {
    /// mbind really binds: node 0 exists on every Linux machine, and the kernel reports the
    /// policy of the pages afterwards.
    #[cfg(feature = "numa")]
    #[test]
    fn binding_to_node_zero_sets_the_policy() {
        const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
        let mut map = memmap2::MmapMut::map_anon(1 << 20).unwrap();
        map.fill(1);
        // SAFETY: the mapping is page-aligned, mapped and idle.
        unsafe { super::bind_to_node(map.as_ptr(), map.len(), 0) }.unwrap();
        let mut mode: libc::c_int = -1;
        let mut mask = [0 as libc::c_ulong; 16];
        // SAFETY: mode and mask are valid output space for 1024 bits; the address is mapped.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &raw mut mode,
                mask.as_mut_ptr(),
                (mask.len() * 64) as libc::c_ulong,
                map.as_ptr(),
                MPOL_F_ADDR,
            )
        };
        assert_eq!(rc, 0, "get_mempolicy: {}", std::io::Error::last_os_error());
        assert_eq!(mode, super::MPOL_BIND);
        assert_eq!(mask[0], 1, "bound to node 0 only");
    }

    #[test]
    fn node_lists_parse() {
        assert_eq!(super::parse_node_list("0\n").unwrap(), vec![0]);
        assert_eq!(super::parse_node_list("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(super::parse_node_list("").unwrap(), Vec::<usize>::new());
        assert!(super::parse_node_list("3-1").is_err());
        assert!(super::parse_node_list("x").is_err());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placement_reports_why_not_instead_of_failing() {
        let buf = vec![0u8; 1 << 16];
        // SAFETY: the buffer is mapped and idle.
        let r = unsafe { super::place_for_device(buf.as_ptr(), buf.len(), "no_such_device0") };
        let reason = r.expect_err("a device that does not exist cannot have a placement");
        // The reason is the one for this machine, counted here without hwloc: the kernel's NUMA
        // nodes (a machine without /sys/devices/system/node has one).
        let nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.strip_prefix("node").is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count()
            })
            .unwrap_or(1)
            .max(1);
        if cfg!(not(feature = "numa")) {
            assert!(reason.contains("without the `numa` feature"), "{reason}");
        } else if nodes == 1 {
            assert_eq!(reason, "1 NUMA node(s): nothing to place");
        } else {
            assert!(reason.contains("hwloc does not see no_such_device0"), "{nodes} NUMA nodes: {reason}");
        }
    }
}
