//! The link's signals and the backend's life across VMM connections, with
//! plain sockets standing in for the VMM (no guest memory, no QEMU).

use super::*;
use std::time::Instant;

fn scratch(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("slw-vu-unit-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn link_pair() -> (VhostUserLink, Socket) {
    let (a, b) = frame_socket_pair().unwrap();
    let link = VhostUserLink {
        sock: a,
        counters: Arc::new(Counters::default()),
        offload: true,
    };
    (link, b)
}

/// `recv` until something other than WouldBlock, for at most `limit`.
fn recv_within(link: &mut VhostUserLink, limit: Duration) -> io::Result<Vec<u8>> {
    let until = Instant::now() + limit;
    let mut buf = vec![0; MAX_FRAME + 64];
    loop {
        match link.recv(&mut buf) {
            Ok((n, _)) => return Ok(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn link_reports_a_vmm_that_left_once_then_carries_frames_again() {
    let (mut link, backend) = link_pair();
    (&backend).write_all(&[VMM_GONE]).unwrap();
    (&backend).write_all(&[7u8; 60]).unwrap();
    let gone = recv_within(&mut link, Duration::from_secs(1)).unwrap_err();
    assert_eq!(gone.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        recv_within(&mut link, Duration::from_secs(1)).unwrap(),
        vec![7u8; 60]
    );
}

#[test]
fn link_skips_runts_and_refuses_frames_no_guest_takes() {
    let (mut link, backend) = link_pair();
    (&backend).write_all(&[1, 2, 3]).unwrap();
    (&backend).write_all(&[9u8; 14]).unwrap();
    assert_eq!(
        recv_within(&mut link, Duration::from_secs(1))
            .unwrap()
            .len(),
        14
    );
    for len in [0, 13, MAX_FRAME + 1] {
        let err = link.send(&vec![0; len]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{len}-byte frame");
    }
    link.send(&vec![5; MAX_FRAME]).unwrap();
    let mut buf = vec![0; MAX_FRAME + 1];
    assert_eq!((&backend).read(&mut buf).unwrap(), MAX_FRAME);
}

#[test]
fn link_says_eof_when_the_backend_is_gone() {
    let (mut link, backend) = link_pair();
    drop(backend);
    let err = recv_within(&mut link, Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn listen_refuses_a_socket_another_backend_answers_on() {
    let dir = scratch("inuse");
    let path = dir.join("net.sock");
    let first = VhostUserNet::listen(&path).unwrap();
    match VhostUserNet::listen(&path) {
        Err(Error::InUse { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two backends on one socket"),
    }
    drop(first);
    assert!(!path.exists(), "the socket file stays behind");
    // A stale file (nobody answers) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let again = VhostUserNet::listen(&path).unwrap();
    drop(again);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_vmm_that_leaves_resets_the_link_once_and_the_next_is_served() {
    let dir = scratch("reconnect");
    let path = dir.join("net.sock");
    let net = VhostUserNet::listen(&path).unwrap();
    let mut link = net.link().unwrap();
    for round in 1..=3u64 {
        let vmm = UnixStream::connect(&path).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while net.stats().connections < round {
            assert!(Instant::now() < until, "connection {round} never accepted");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(net.stats().connected);
        drop(vmm);
        let err = recv_within(&mut link, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "round {round}");
        assert!(!net.stats().connected);
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_from_the_vmm_ends_that_connection_only() {
    let dir = scratch("garbage");
    let path = dir.join("net.sock");
    let net = VhostUserNet::listen(&path).unwrap();
    let mut link = net.link().unwrap();
    // An unknown request with a body the size limit refuses.
    let mut vmm = UnixStream::connect(&path).unwrap();
    let mut msg = Vec::new();
    msg.extend_from_slice(&9999u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&u32::MAX.to_le_bytes());
    vmm.write_all(&msg).unwrap();
    let mut buf = [0u8; 16];
    vmm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(vmm.read(&mut buf).unwrap(), 0, "the backend hangs up");
    assert_eq!(
        recv_within(&mut link, Duration::from_secs(5))
            .unwrap_err()
            .kind(),
        io::ErrorKind::ConnectionReset
    );
    // The next VMM is served: GET_FEATURES gets an answer.
    let mut vmm = UnixStream::connect(&path).unwrap();
    let mut get = Vec::new();
    get.extend_from_slice(&1u32.to_le_bytes());
    get.extend_from_slice(&1u32.to_le_bytes());
    get.extend_from_slice(&0u32.to_le_bytes());
    vmm.write_all(&get).unwrap();
    let mut reply = [0u8; 20];
    vmm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    vmm.read_exact(&mut reply).unwrap();
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_eq!(features, device::offered_features(true, true, true));
    drop(vmm);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn drop_cuts_a_connected_vmm_and_returns_promptly() {
    let dir = scratch("drop");
    let path = dir.join("net.sock");
    let net = VhostUserNet::listen(&path).unwrap();
    let mut vmm = UnixStream::connect(&path).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while !net.stats().connected {
        assert!(Instant::now() < until, "never accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    drop(net);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    vmm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        vmm.read(&mut buf).unwrap(),
        0,
        "the VMM sees the backend go"
    );
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole backend driven as a VMM drives it: vhost-user messages from
/// the `vhost` crate's frontend (through the relay), guest memory in a
/// memfd both sides map, queues built with virtio-queue's driver-side mock.
mod with_a_frontend {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    };
    use vmm_sys_util::eventfd::EventFd;

    const MEM: usize = 16 << 20;
    const QSIZE: u16 = 64;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x1_0000;
    const RX_BUFS: u64 = 0x10_0000;
    const TX_BUFS: u64 = 0x80_0000;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn guest_memory() -> GuestMemoryMmap {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // descriptor it returns is ours alone.
        let fd = unsafe { libc::memfd_create(c"slipway-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM as u64).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap()
    }

    struct Vmm {
        frontend: Frontend,
        kicks: [EventFd; 2],
        calls: [EventFd; 2],
    }

    /// Connect and set the device up the way QEMU does, minus the guest.
    fn connect(path: &Path, mem: &GuestMemoryMmap) -> Vmm {
        let mut frontend = Frontend::connect(path, 2).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        assert_eq!(offered, device::offered_features(true, true, true));
        // Everything but EVENT_IDX: interrupts by the plain flags here.
        frontend
            .set_features(offered & !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX))
            .unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(proto & VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM as u64,
                userspace_addr: host,
                mmap_offset: 0,
                mmap_handle: region.file_offset().unwrap().file().as_raw_fd(),
            }])
            .unwrap();
        let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let calls = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        for (q, ring) in [(0usize, RX_RING), (1, TX_RING)] {
            let mq = MockSplitQueue::create(mem, GuestAddress(ring), QSIZE);
            frontend.set_vring_num(q, QSIZE).unwrap();
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QSIZE,
                        queue_size: QSIZE,
                        flags: 0,
                        desc_table_addr: host + mq.desc_table_addr().0,
                        used_ring_addr: host + mq.used_addr().0,
                        avail_ring_addr: host + mq.avail_addr().0,
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            frontend.set_vring_call(q, &calls[q]).unwrap();
            frontend.set_vring_kick(q, &kicks[q]).unwrap();
            frontend.set_vring_enable(q, true).unwrap();
        }
        Vmm {
            frontend,
            kicks,
            calls,
        }
    }

    fn wait(what: &str, mut done: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn used(mq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let n = mq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = mq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    #[test]
    fn frames_cross_both_ways_and_bad_chains_do_not_stop_the_device() {
        let dir = scratch("frontend");
        let path = dir.join("net.sock");
        let net = VhostUserNet::listen(&path).unwrap();
        let mut link = net.link().unwrap();
        let mem = guest_memory();
        let vmm = connect(&path, &mem);
        let rx = MockSplitQueue::create(&mem, GuestAddress(RX_RING), QSIZE);
        let tx = MockSplitQueue::create(&mem, GuestAddress(TX_RING), QSIZE);

        // Guest → stack: a chain pointing outside guest memory, a looping
        // one, then a good frame (header and frame in separate descriptors).
        let frame: Vec<u8> = (0..60u8).collect();
        mem.write_slice(&[0u8; 12], GuestAddress(TX_BUFS)).unwrap();
        mem.write_slice(&frame, GuestAddress(TX_BUFS + 0x100))
            .unwrap();
        tx.add_desc_chains(&[desc(MEM as u64 * 2, 72, 0, 0)], 0)
            .unwrap();
        tx.add_desc_chains(
            &[
                desc(TX_BUFS, 12, VRING_DESC_F_NEXT, 2),
                desc(TX_BUFS, 12, VRING_DESC_F_NEXT, 1),
            ],
            1,
        )
        .unwrap();
        tx.add_desc_chains(
            &[
                desc(TX_BUFS, 12, VRING_DESC_F_NEXT, 4),
                desc(TX_BUFS + 0x100, 60, 0, 0),
            ],
            3,
        )
        .unwrap();
        vmm.kicks[1].write(1).unwrap();
        assert_eq!(
            recv_within(&mut link, Duration::from_secs(5)).unwrap(),
            frame
        );
        wait("the transmit chains back", || used(&tx).len() == 3);
        assert_eq!(used(&tx), vec![(0, 0), (1, 0), (3, 0)]);
        assert_eq!(net.stats().bad_chains, 2);
        assert!(vmm.calls[1].read().is_ok(), "the guest was interrupted");

        // Stack → guest: a 64 KiB frame waits for buffers, then spreads
        // over mergeable ones, all published at once.
        let big: Vec<u8> = (0..65534u32).map(|i| (i % 251) as u8).collect();
        link.send(&big).unwrap();
        let bufs = |from: u16, count: u16| -> Vec<RawDescriptor> {
            (from..from + count)
                .map(|i| desc(RX_BUFS + u64::from(i) * 0x1000, 4096, VRING_DESC_F_WRITE, 0))
                .collect()
        };
        rx.add_desc_chains(&bufs(0, 4), 0).unwrap();
        vmm.kicks[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(used(&rx).is_empty(), "4 buffers cannot hold 64 KiB");
        rx.add_desc_chains(&bufs(4, 20), 4).unwrap();
        vmm.kicks[0].write(1).unwrap();
        wait("the big frame in the guest", || !used(&rx).is_empty());
        let entries = used(&rx);
        let want = (12 + big.len()).div_ceil(4096);
        assert_eq!(entries.len(), want, "{entries:?}");
        let mut got = Vec::new();
        for (id, len) in &entries {
            let mut b = vec![0; *len as usize];
            mem.read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(*id) * 0x1000))
                .unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]) as usize, want);
        assert_eq!(&got[12..], &big[..]);
        assert!(vmm.calls[0].read().is_ok(), "the guest was interrupted");

        // The VMM goes; the stack hears of it once.
        drop(vmm.frontend);
        let err = recv_within(&mut link, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        drop(net);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
