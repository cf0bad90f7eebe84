//! What the kernel knows about a TCP connection's sending side (`TCP_INFO`): for the debug log
//! at the end of a session, whether a hop was held back by the receiver's window, by its own
//! send buffer, or by neither (then the link or the congestion control set the pace); and for a
//! lane's liveness, what it has in flight and what was acknowledged.

use std::os::fd::RawFd;

/// A few fields of `struct tcp_info`, times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpStats {
    /// Time with data in flight or queued.
    pub(crate) busy_ms: u64,
    /// Of that, time the receiver's advertised window was the limit.
    pub(crate) rwnd_limited_ms: u64,
    /// Of that, time the send buffer was the limit (the application did not keep it full).
    pub(crate) sndbuf_limited_ms: u64,
    /// Segments retransmitted over the connection's life.
    pub(crate) total_retrans: u32,
    /// Smoothed round-trip time, microseconds.
    pub(crate) rtt_us: u32,
    /// Congestion window, segments.
    pub(crate) snd_cwnd: u32,
    /// The kernel's latest delivery rate sample, bytes per second (0: none yet): what the
    /// path takes, from the ACKs, whatever the send buffer holds.
    pub(crate) delivery_rate: u64,
    /// Bytes in the send buffer not sent yet.
    pub(crate) notsent_bytes: u32,
}

/// Reads `TCP_INFO` of a connected TCP socket; None when the kernel refuses (not TCP, closed)
/// or its struct is shorter than `needed` bytes (an older kernel's).
fn read_info(fd: RawFd, needed: usize) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len) };
    (rc == 0 && (len as usize) >= needed).then_some(info)
}

/// Reads `TCP_INFO` of a connected TCP socket; None when the kernel refuses (not TCP, closed).
pub(crate) fn tcp_stats(fd: RawFd) -> Option<TcpStats> {
    // The limited-time fields exist since Linux 4.10.
    let info = read_info(fd, std::mem::offset_of!(libc::tcp_info, tcpi_sndbuf_limited) + 8)?;
    Some(TcpStats {
        busy_ms: info.tcpi_busy_time / 1000,
        rwnd_limited_ms: info.tcpi_rwnd_limited / 1000,
        sndbuf_limited_ms: info.tcpi_sndbuf_limited / 1000,
        total_retrans: info.tcpi_total_retrans,
        rtt_us: info.tcpi_rtt,
        snd_cwnd: info.tcpi_snd_cwnd,
        delivery_rate: info.tcpi_delivery_rate,
        notsent_bytes: info.tcpi_notsent_bytes,
    })
}

/// What a connected TCP socket has in flight and had acknowledged; None when the kernel
/// refuses (not TCP, closed; `tcpi_bytes_acked` exists since Linux 4.1).
pub(crate) fn ack_state(fd: RawFd) -> Option<crate::proto::stall::Acks> {
    let info = read_info(fd, std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8)?;
    Some(crate::proto::stall::Acks { unacked: info.tcpi_unacked, bytes_acked: info.tcpi_bytes_acked })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_a_loopback_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(&[1u8; 100_000]).unwrap();
        let mut buf = vec![0u8; 100_000];
        b.read_exact(&mut buf).unwrap();
        let s = super::tcp_stats(a.as_raw_fd()).expect("TCP_INFO on a TCP socket");
        assert!(s.snd_cwnd > 0, "{s:?}");
        assert!(s.delivery_rate > 0, "100 kB were acked: {s:?}");
        // Everything sent was read; its last ACK may be delayed a little.
        let t0 = std::time::Instant::now();
        let acked = loop {
            let s = super::ack_state(a.as_raw_fd()).expect("TCP_INFO on a TCP socket");
            if s.unacked == 0 || t0.elapsed() > std::time::Duration::from_secs(2) {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(acked.unacked, 0, "{acked:?}");
        assert!(acked.bytes_acked >= 100_000, "{acked:?}");
    }
}
