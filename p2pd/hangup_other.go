//go:build !linux

package main

import "net"

// Elsewhere a client's half-close cannot be told from the close of its socket: the stream then ends with the peer,
// as it did before.

func pollShutdown(net.Conn) (readEnded, hungUp bool) { return false, false }

func awaitHangUp(net.Conn, func() bool) bool { return false }
