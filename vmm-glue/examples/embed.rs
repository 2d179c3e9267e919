//! A custom VMM's view of slipway: start a sandbox network in-process, hand
//! it the frames a guest would send, and read what it answers. Here the
//! "guest" asks DHCP for its address and ARPs for its gateway.
//!
//! Run: `cargo run -p vmm-glue --example embed`

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netstack::{EgressPolicy, StackConfig};
// The guest's frames come from slipway's frame kit (fuzz/harness/src/kit.rs);
// a real VMM gets them from its guest.
use slipway_fuzz::kit;
use smoltcp::wire::{
    ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetFrame, EthernetProtocol,
    Ipv4Packet, UdpPacket,
};
use vmm_glue::embed::{SandboxNet, MAX_FRAME};

fn main() -> io::Result<()> {
    let net = SandboxNet::start(StackConfig::default(), EgressPolicy::allow_all())?;

    net.send_frame(&dhcp_discover())?;
    // The stack also speaks up on its own (an IPv6 router advertisement at
    // start): take frames until the answer comes.
    let offered = loop {
        if let Some(dhcp) = parse_dhcp(&wait_frame(&net)?) {
            break dhcp;
        }
    };
    println!(
        "DHCP: {:?} of {} (router {:?}, server {:?})",
        offered.message_type, offered.your_ip, offered.router, offered.server_identifier
    );

    let gateway = offered.router.unwrap_or(Ipv4Addr::new(10, 0, 2, 2));
    net.send_frame(&kit::arp_request(offered.your_ip, gateway))?;
    let arp = loop {
        let reply = wait_frame(&net)?;
        let eth = EthernetFrame::new_checked(&reply[..]).expect("an Ethernet frame");
        if eth.ethertype() == EthernetProtocol::Arp {
            break ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("ARP"))
                .expect("ARP");
        }
    };
    if let ArpRepr::EthernetIpv4 {
        source_hardware_addr,
        source_protocol_addr,
        ..
    } = arp
    {
        println!("ARP: {source_protocol_addr} is at {source_hardware_addr}");
    }
    Ok(())
}

/// Wait (poll(2) on the sandbox's descriptor, as a VMM's event loop would) for one frame.
fn wait_frame(net: &SandboxNet) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; MAX_FRAME];
    loop {
        match net.recv_frame(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: net.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll reads and writes one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 5000) } == 0 {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in 5 s"));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// What an unconfigured guest sends first: a DHCP discover, broadcast.
fn dhcp_discover() -> Vec<u8> {
    kit::dhcp_frame(&DhcpRepr {
        broadcast: true,
        ..kit::dhcp_message(DhcpMessageType::Discover)
    })
}

fn parse_dhcp(frame: &[u8]) -> Option<DhcpRepr<'static>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    // Leak the payload so the parsed repr can outlive this frame; fine in an example.
    let payload: &'static [u8] = Box::leak(udp.payload().to_vec().into_boxed_slice());
    let packet: &'static DhcpPacket<&'static [u8]> =
        Box::leak(Box::new(DhcpPacket::new_checked(payload).ok()?));
    DhcpRepr::parse(packet).ok()
}
