//! What unit tests read off real sockets that the standard library and socket2 do not
//! expose. Test builds only.

use std::os::fd::{AsFd, AsRawFd};

/// TCP segments `socket` has sent: `tcpi_segs_out` of the kernel's `TCP_INFO` (Linux
/// 4.2 on), which libc's `tcp_info` struct stops short of, so it is read at its offset.
pub fn tcp_segments_sent(socket: &impl AsFd) -> u32 {
    const SEGS_OUT: usize = 136;
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
        len as usize >= SEGS_OUT + 4,
        "TCP_INFO too short: {len} bytes"
    );
    u32::from_ne_bytes([
        info[SEGS_OUT],
        info[SEGS_OUT + 1],
        info[SEGS_OUT + 2],
        info[SEGS_OUT + 3],
    ])
}
