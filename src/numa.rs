//! Buffer pool placement on the NUMA node of the NIC that moves it, through hwloc (the
//! `hwlocality` binding, feature `numa`).
//!
//! hwloc knows each RDMA device as an OpenFabrics OS device under a PCI device; the first
//! non-I/O ancestor of that device is the part of the machine (package, NUMA node) it is
//! attached to. The pool's pages are bound to that node's memory, and migrated there, before
//! the pool is registered with the NIC (registration pins them where they are).
//! Soft-RoCE devices and single-node machines have no locality to act on: nothing happens.

/// Binds `len` bytes at `base` (a whole buffer pool, page-aligned) to the NUMA node(s) local
/// to RDMA device `device`, moving pages already there. Returns the nodes, or why not.
///
/// # Safety
/// `base..base+len` is mapped, and no I/O writes into it during the call (pages may move).
#[cfg(feature = "numa")]
pub unsafe fn place_for_device(base: *const u8, len: usize, device: &str) -> Result<String, String> {
    use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
    use hwlocality::object::types::ObjectType;
    use hwlocality::topology::builder::TypeFilter;
    use std::sync::OnceLock;

    static TOPOLOGY: OnceLock<Result<hwlocality::Topology, String>> = OnceLock::new();
    let topology = TOPOLOGY
        .get_or_init(|| {
            hwlocality::Topology::builder()
                .with_io_type_filter(TypeFilter::KeepImportant)
                .map_err(|e| e.to_string())?
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| format!("hwloc topology: {e}"))?;
    let numa_nodes = topology.objects_with_type(ObjectType::NUMANode).count();
    if numa_nodes <= 1 {
        return Err(format!("{numa_nodes} NUMA node(s): nothing to place"));
    }
    let dev = topology
        .objects_with_type(ObjectType::OSDevice)
        .find(|o| o.name().is_some_and(|n| n.to_bytes() == device.as_bytes()))
        .ok_or_else(|| format!("hwloc does not see {device} (soft-RoCE has no locality)"))?;
    let nodeset = dev
        .first_non_io_ancestor()
        .and_then(|a| a.nodeset())
        .ok_or_else(|| format!("{device} has no NUMA locality in hwloc"))?
        .clone_target();
    // SAFETY: the caller keeps the range mapped and idle for the call.
    let area = unsafe { std::slice::from_raw_parts(base, len) };
    topology
        .bind_memory_area(area, &nodeset, MemoryBindingPolicy::Bind, MemoryBindingFlags::MIGRATE)
        .map_err(|e| format!("binding the pool to NUMA node(s) {nodeset}: {e}"))?;
    Ok(nodeset.to_string())
}

/// Without the `numa` feature pools stay where the kernel put them.
///
/// # Safety
/// None needed; the signature matches the hwloc version.
#[cfg(not(feature = "numa"))]
pub unsafe fn place_for_device(_: *const u8, _: usize, _: &str) -> Result<String, String> {
    Err("built without the `numa` feature".into())
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
