package main

import (
	"fmt"
	"net"
	"strings"
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func TestCheckListenPortsFree(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	busy := ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port))
	err = checkListenPortsFree([]ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/0"), busy})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("TCP port %d is already in use", port)) ||
		!strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("a taken port was not reported: %v", err)
	}
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freePort := free.Addr().(*net.TCPAddr).Port
	free.Close()
	again := ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freePort))
	if err := checkListenPortsFree([]ma.Multiaddr{again, ma.StringCast("/ip4/127.0.0.1/udp/0/quic-v1")}); err != nil {
		t.Fatalf("a free port was refused: %v", err)
	}
}
