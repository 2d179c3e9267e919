//! A custom VMM's view of slipway: start a sandbox network in-process, hand
//! it the frames a guest would send, and read what it answers. Here the
//! "guest" asks DHCP for its address and ARPs for its gateway.
//!
//! Run: `cargo run -p vmm-glue --example embed`

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netstack::{EgressPolicy, StackConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr,
};
use vmm_glue::embed::{SandboxNet, MAX_FRAME};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

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
    net.send_frame(&arp_request(offered.your_ip, gateway))?;
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

fn ethernet(dst: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: dst,
        ethertype,
    };
    let mut frame = vec![0; repr.buffer_len() + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    repr.emit(&mut eth);
    eth.payload_mut().copy_from_slice(payload);
    frame
}

fn dhcp_discover() -> Vec<u8> {
    let dhcp = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 0x5eed,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: Some(GUEST_MAC),
        server_identifier: None,
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut body = vec![0; dhcp.buffer_len()];
    dhcp.emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .expect("DHCP emit");
    let (src, dst) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
    let udp = UdpRepr {
        src_port: 68,
        dst_port: 67,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: 8 + body.len(),
        hop_limit: 64,
    };
    let mut packet = vec![0; ip.buffer_len() + 8 + body.len()];
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut packet[..]),
        &ChecksumCapabilities::default(),
    );
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut packet[ip.buffer_len()..]),
        &src.into(),
        &dst.into(),
        body.len(),
        |p| p.copy_from_slice(&body),
        &ChecksumCapabilities::default(),
    );
    ethernet(EthernetAddress::BROADCAST, EthernetProtocol::Ipv4, &packet)
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

fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: sender,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut body = vec![0; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut body[..]));
    ethernet(EthernetAddress::BROADCAST, EthernetProtocol::Arp, &body)
}
