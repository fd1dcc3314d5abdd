// A stand-in for github.com/libp2p/go-libp2p-asn-util (see asn.go), wired in by the replace directive in ../go.mod.
module github.com/libp2p/go-libp2p-asn-util

go 1.20
