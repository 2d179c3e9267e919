//! The embedding API end to end: a userspace guest (smoltcp) drives a
//! `SandboxNet` purely through `send_frame` / `recv_frame` and the pollable
//! descriptor, reaching a real server on the host's loopback through the
//! stack, and being refused where the policy says so.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netstack::{EgressPolicy, PolicySpec, StackConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use vmm_glue::embed::{SandboxNet, MAX_FRAME};

/// The guest's NIC: frames go straight into the SandboxNet and come out of it.
struct Nic<'a> {
    net: &'a SandboxNet,
    rx: Option<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a SandboxNet);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.send_frame(&buf).expect("the stack takes the frame");
        r
    }
}

impl Device for Nic<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.take()?;
        Some((Rx(frame), Tx(self.net)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(self.net))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

struct Guest {
    iface: Interface,
    sockets: SocketSet<'static>,
    started: Instant,
}

impl Guest {
    fn new(net: &SandboxNet) -> Guest {
        let mut nic = Nic { net, rx: None };
        let mut cfg = Config::new(EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]).into());
        cfg.random_seed = 7;
        let mut iface = Interface::new(cfg, &mut nic, SmolInstant::from_millis(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2))
            .unwrap();
        Guest {
            iface,
            sockets: SocketSet::new(Vec::new()),
            started: Instant::now(),
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_millis(self.started.elapsed().as_millis() as i64)
    }

    /// Run the guest until `done` or 5 s, waiting on the sandbox's descriptor.
    fn run_until(&mut self, net: &SandboxNet, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0; MAX_FRAME];
        while !done(self) {
            assert!(Instant::now() < deadline, "the guest timed out");
            let rx = match net.recv_frame(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: net.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll reads and writes one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                    None
                }
                Err(e) => panic!("recv_frame: {e}"),
            };
            let now = self.now();
            let mut nic = Nic { net, rx };
            self.iface.poll(now, &mut nic, &mut self.sockets);
        }
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        s.connect(
            self.iface.context(),
            (IpAddress::v4(10, 0, 2, 2), port),
            40000,
        )
        .unwrap();
        self.sockets.add(s)
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

fn config() -> StackConfig {
    StackConfig {
        host_loopback_aliases: vec![Ipv4Addr::new(10, 0, 2, 2).into()],
        ..StackConfig::default()
    }
}

#[test]
fn an_embedded_guest_reaches_a_host_server_through_the_stack() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        c.write_all(&buf[..n]).unwrap();
    });
    let net = SandboxNet::start(config(), EgressPolicy::allow_all()).unwrap();
    let mut guest = Guest::new(&net);
    let h = guest.connect(port);
    guest.run_until(&net, |g| g.tcp(h).may_send());
    guest
        .tcp(h)
        .send_slice(b"hello from an embedded guest")
        .unwrap();
    let mut got = Vec::new();
    guest.run_until(&net, |g| {
        let s = g.tcp(h);
        if s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == 28
    });
    assert_eq!(got, b"hello from an embedded guest");
    echo.join().unwrap();
}

#[test]
fn an_embedded_guest_is_refused_what_the_policy_denies() {
    let spec = PolicySpec {
        deny_out: vec!["ALL_TRAFFIC".into()],
        ..PolicySpec::default()
    };
    let policy = EgressPolicy::from_spec(&spec).unwrap();
    let net = SandboxNet::start(StackConfig::default(), policy).unwrap();
    let mut guest = Guest::new(&net);
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    s.connect(
        guest.iface.context(),
        (IpAddress::v4(192, 0, 2, 1), 80),
        40001,
    )
    .unwrap();
    let h = guest.sockets.add(s);
    guest.run_until(&net, |g| g.tcp(h).state() == tcp::State::Closed);
    let snapshot = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(net.handle().snapshot())
        .expect("the stack answers");
    assert_eq!(snapshot.stats.tcp_denied, 1);
}

#[test]
fn dropping_the_sandbox_net_stops_its_thread() {
    let net = SandboxNet::start(StackConfig::default(), EgressPolicy::allow_all()).unwrap();
    let handle = net.handle();
    drop(net); // joins the thread; hangs here if the stack did not stop
    assert!(
        !handle.set_policy(EgressPolicy::allow_all()),
        "the stack still runs"
    );
}

#[test]
fn a_frame_over_max_frame_is_refused_and_the_stack_serves_on() {
    let net = SandboxNet::start(StackConfig::default(), EgressPolicy::allow_all()).unwrap();
    let err = net.send_frame(&vec![0u8; MAX_FRAME + 1]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains(&format!("{}-byte", MAX_FRAME + 1)),
        "{err}"
    );
    // The largest frame goes (and is dropped as garbage inside): the stack,
    // which reads into MAX_FRAME-byte buffers, is still there to answer.
    net.send_frame(&vec![0u8; MAX_FRAME]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        rt.block_on(net.handle().snapshot()).is_some(),
        "the stack stopped"
    );
}
