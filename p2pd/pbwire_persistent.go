package main

// Wire format of the messages on a persistent connection between the daemon and its client (unary calls and
// their handlers); the framing and the shared helpers are in pbwire.go.

import (
	"errors"

	"google.golang.org/protobuf/encoding/protowire"
)

type persistentRequest struct {
	callID  []byte
	kind    protowire.Number // which oneof member is set; 0 if none
	payload []byte           // its encoded sub-message
}

func decodePersistentRequest(b []byte) (*persistentRequest, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	r := &persistentRequest{}
	hasCallID := false
	for _, f := range fields {
		if f.typ != protowire.BytesType {
			continue
		}
		switch f.num {
		case 1:
			r.callID = f.bytes
			hasCallID = true
		case pcReqAddUnaryHandler, pcReqCallUnary, pcReqUnaryResponse, pcReqCancel, pcReqRemoveUnaryHandler:
			r.kind = f.num
			r.payload = nonNil(f.bytes)
		}
	}
	if !hasCallID {
		return nil, errors.New("malformed PersistentConnectionRequest: missing required field `callId`")
	}
	return r, nil
}

// peekCallID extracts callId from the beginning of an encoded PersistentConnectionRequest (field 1 comes first
// in every serializer we know), so that an oversized request can still be answered with an error.
func peekCallID(prefix []byte) []byte {
	num, typ, n := protowire.ConsumeTag(prefix)
	if n < 0 || num != 1 || typ != protowire.BytesType {
		return nil
	}
	v, m := protowire.ConsumeBytes(prefix[n:])
	if m < 0 {
		return nil
	}
	return v
}

type unaryHandlerRequest struct {
	proto    string
	balanced bool
}

// decodeUnaryHandlerRequest decodes AddUnaryHandlerRequest and RemoveUnaryHandlerRequest (proto=1, balanced=2).
func decodeUnaryHandlerRequest(b []byte) (*unaryHandlerRequest, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	r := &unaryHandlerRequest{}
	hasProto := false
	for _, f := range fields {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			r.proto = string(f.bytes)
			hasProto = true
		case f.num == 2 && f.typ == protowire.VarintType:
			r.balanced = f.value != 0
		}
	}
	if !hasProto {
		return nil, errors.New("malformed unary handler request: missing required field `proto`")
	}
	return r, nil
}

type callUnaryRequest struct {
	peer  []byte
	proto string
	data  []byte
}

func decodeCallUnary(b []byte) (*callUnaryRequest, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	r := &callUnaryRequest{}
	var seen [4]bool
	for _, f := range fields {
		if f.typ != protowire.BytesType || f.num < 1 || f.num > 3 {
			continue
		}
		seen[f.num] = true
		switch f.num {
		case 1:
			r.peer = f.bytes
		case 2:
			r.proto = string(f.bytes)
		case 3:
			r.data = f.bytes
		}
	}
	if !seen[1] || !seen[2] {
		return nil, errors.New("malformed CallUnaryRequest: missing required field `peer` or `proto`")
	}
	return r, nil
}

func encodeCallUnary(r *callUnaryRequest) []byte {
	b := appendBytesField(nil, 1, r.peer)
	b = appendStringField(b, 2, r.proto)
	return appendBytesField(b, 3, r.data) // always written: `data` is required
}

// encodePersistentResponse builds PersistentConnectionResponse{callId, <kind>=payload}; kind 0 = empty (OK).
func encodePersistentResponse(callID []byte, kind protowire.Number, payload []byte) []byte {
	b := appendBytesField(make([]byte, 0, len(callID)+len(payload)+16), 1, callID)
	if kind != 0 {
		b = appendBytesField(b, kind, payload)
	}
	return b
}

func encodeDaemonError(callID []byte, msg string) []byte {
	return encodePersistentResponse(callID, pcRespDaemonError, appendStringField(nil, 1, msg))
}

func encodeCancelResponse(callID []byte) []byte {
	return encodePersistentResponse(callID, pcRespCancel, []byte{})
}
