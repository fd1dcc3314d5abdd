package main

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// yamuxFlagFIN is the flag of a frame that half-closes its stream (the spec's value)
const yamuxFlagFIN uint16 = 4

// A peer may half-close a stream with the FIN flag on its last data frame (the yamux spec allows it on a data
// frame or a window update). The frame's payload comes before the end of the stream: a Read that runs after the
// header arrived but before the payload was read gets those bytes, not EOF. (go-yamux processed the FIN before
// reading the payload: such a Read returned EOF and the last frame's bytes were lost.)
func TestFinOnDataFrameKeepsItsPayload(t *testing.T) {
	for _, lend := range []bool{false, true} {
		name := "Read after the header"
		if lend {
			name = "Read waiting when the header arrives"
		}
		t.Run(name, func(t *testing.T) {
			peerConn, serverConn := net.Pipe()
			raw := acceptRawStream(t, newYamuxTransport(), serverConn, peerConn)
			defer raw.Close()
			payload := bytes.Repeat([]byte{9}, 40<<10)
			got := make(chan []byte, 1)
			startRead := func() {
				go func() {
					b, err := io.ReadAll(raw.stream)
					if err != nil {
						t.Errorf("reading the stream failed: %v", err)
					}
					got <- b
				}()
			}
			if lend {
				startRead()
				time.Sleep(20 * time.Millisecond) // the reader waits in Read (lends its buffer)
			}
			raw.peer.frame(t, 0, yamuxFlagFIN, uint32(len(payload))) // returns once the session read the header
			if !lend {
				startRead()
			}
			time.Sleep(50 * time.Millisecond) // the reader sees the stream half-closed before the payload comes
			if _, err := peerConn.Write(payload); err != nil {
				t.Fatal(err)
			}
			select {
			case b := <-got:
				if !bytes.Equal(b, payload) {
					t.Fatalf("the reader got %d bytes before EOF, the FIN frame carried %d", len(b), len(payload))
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the reader got no EOF after a data frame with FIN")
			}
		})
	}
}
