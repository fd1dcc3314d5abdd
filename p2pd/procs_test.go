package main

import "testing"

func TestDefaultProcs(t *testing.T) {
	for ncpu, want := range map[int]int{1: 1, 2: 1, 4: 1, 8: 2, 12: 3, 16: 4, 64: 4} {
		if got := defaultProcs(ncpu); got != want {
			t.Errorf("defaultProcs(%d) = %d, want %d", ncpu, got, want)
		}
	}
}
