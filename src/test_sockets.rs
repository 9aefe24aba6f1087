//! What tests read off real sockets that the standard library and socket2 do not expose:
//! the kernel's TCP segment counters. Test builds only (the unit tests, and the
//! integration tests through `tests/common`).

use std::os::fd::{AsFd, AsRawFd};

/// TCP segments `socket` has sent: `tcpi_segs_out` of the kernel's `TCP_INFO` (Linux
/// 4.2 on).
pub fn tcp_segments_sent(socket: &impl AsFd) -> u32 {
    tcp_info_u32(socket, 136)
}

/// TCP segments `socket` has received, pure ACKs and bare FINs included: `tcpi_segs_in`.
pub fn tcp_segments_received(socket: &impl AsFd) -> u32 {
    tcp_info_u32(socket, 140)
}

/// The `u32` at `offset` in the kernel's `tcp_info`, read at its offset because libc's
/// `tcp_info` struct stops short of the segment counters.
fn tcp_info_u32(socket: &impl AsFd, offset: usize) -> u32 {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    assert!(
        len as usize >= offset + 4,
        "TCP_INFO too short: {len} bytes"
    );
    u32::from_ne_bytes([
        info[offset],
        info[offset + 1],
        info[offset + 2],
        info[offset + 3],
    ])
}
