#!/usr/bin/env python3
"""Opens one WebSocket to HOST:PORT/ws with the standard library and prints the first text
message (the demo echo backends greet with "connected to NAME"). Exit 1 on any failure."""
import base64, os, socket, sys

def main():
    host, port = sys.argv[1].rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("closed during the handshake")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit("no upgrade: " + head.decode(errors="replace").splitlines()[0])
        while len(rest) < 2:
            rest += s.recv(4096)
        length = rest[1] & 0x7F
        while len(rest) < 2 + length:
            rest += s.recv(4096)
        print(rest[2:2 + length].decode())

if __name__ == "__main__":
    main()
