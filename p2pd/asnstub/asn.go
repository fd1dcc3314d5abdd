// Package asnutil replaces github.com/libp2p/go-libp2p-asn-util inside p2pd.
//
// The real package maps public IPv6 addresses to autonomous system numbers with an embedded table that the relay
// service loads at every start (about 0.3 s of CPU and 30 MB of memory per daemon). The relay service uses it
// only to cap reservations per ASN, and p2pd sets that cap equal to the total number of reservations
// (-relayMaxReservations), so the per-ASN check can never be the one that refuses a reservation. This stand-in
// reports "no ASN known" for every address, which keeps the relay's behaviour and skips the table.
package asnutil

import "net"

// Store has the API of the real package's global store.
var Store = &store{}

type store struct{}

// Init does nothing: there is no table to load.
func (s *store) Init() {}

// AsnForIPv6 returns "" (unknown ASN) for every address.
func (s *store) AsnForIPv6(ip net.IP) (string, error) { return "", nil }
