package main

import (
	"fmt"
	"net"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// localSocketBufferSize is the kernel buffer requested for the local sockets that carry stream bytes; larger
// buffers mean fewer wake-ups of the daemon and the client at high throughput.
const localSocketBufferSize = 4 << 20

// listenControl opens the control socket. Unix sockets are opened with the standard library directly, so that
// accepted connections are plain *net.UnixConn (half-close, buffer sizes); other addresses go through manet.
func listenControl(addr ma.Multiaddr) (net.Listener, error) {
	if path, err := addr.ValueForProtocol(ma.P_UNIX); err == nil {
		return net.Listen("unix", path)
	}
	l, err := manet.Listen(addr)
	if err != nil {
		return nil, err
	}
	return manet.NetListener(l), nil
}

// dialClient connects to a client's callback address (a stream handler).
func dialClient(addr ma.Multiaddr, timeout time.Duration) (net.Conn, error) {
	if path, err := addr.ValueForProtocol(ma.P_UNIX); err == nil {
		return net.DialTimeout("unix", path, timeout)
	}
	network, host, err := manet.DialArgs(addr)
	if err != nil {
		return nil, fmt.Errorf("unsupported handler address %s: %v", addr, err)
	}
	return net.DialTimeout(network, host, timeout)
}

// tuneLocalSocket enlarges the kernel buffers of a connection that will carry stream bytes.
func tuneLocalSocket(conn net.Conn) {
	type bufferSetter interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}
	if s, ok := conn.(bufferSetter); ok {
		_ = s.SetReadBuffer(localSocketBufferSize)
		_ = s.SetWriteBuffer(localSocketBufferSize)
	}
}
