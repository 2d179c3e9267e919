#!/usr/bin/env python3
"""Open tap NAME (IFF_TAP|IFF_NO_PI) and exec the rest of the command line
with the tap's descriptor number in place of the word FD and the descriptor
inherited: how a VMM launcher hands slipway serve a tap it made
(`slipway ctl create ID --tap-fd FD`)."""
import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000

name, cmd = sys.argv[1], sys.argv[2:]
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
os.set_inheritable(fd, True)
os.execvp(cmd[0], [str(fd) if w == "FD" else w for w in cmd])
