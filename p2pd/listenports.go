package main

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// checkListenPortsFree fails when a TCP port given explicitly in -hostAddrs is already taken. go-libp2p listens
// with SO_REUSEPORT, so a second daemon on the same port starts without an error, and the kernel then hands each
// incoming connection to either of the two: peers that dial one of them reach the other one half of the time,
// and their dials fail (a peer id mismatch). A plain listen (no SO_REUSEPORT) on the port finds it taken instead.
// Port 0 (any free port) and other transports are not checked.
func checkListenPortsFree(addrs []ma.Multiaddr) error {
	for _, addr := range addrs {
		port, err := addr.ValueForProtocol(ma.P_TCP)
		if err != nil || port == "0" {
			continue
		}
		netAddr, err := manet.ToNetAddr(addr)
		tcpAddr, isTCP := netAddr.(*net.TCPAddr)
		if err != nil || !isTCP {
			continue // e.g. /tcp/.../ws: go-libp2p reports what it cannot listen on itself
		}
		listener, err := net.ListenTCP("tcp", tcpAddr)
		if err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				return fmt.Errorf("cannot listen on %s from -hostAddrs: TCP port %s is already in use by another "+
					"peer or program (%v); choose another port, or /tcp/0 for any free one", addr, port, err)
			}
			continue // e.g. an address of another machine: go-libp2p reports it with its own error
		}
		listener.Close()
	}
	return nil
}
