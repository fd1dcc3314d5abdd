package main

// roundRobin is a list of handler endpoints served in turn; callers hold daemon.mu.
type roundRobin[T comparable] struct {
	items []T
	next  int
}

func (r *roundRobin[T]) add(item T) {
	r.items = append(r.items, item)
}

// remove deletes one occurrence of item and reports whether it was there.
func (r *roundRobin[T]) remove(item T) bool {
	for i, existing := range r.items {
		if existing == item {
			r.items = append(r.items[:i], r.items[i+1:]...)
			if r.next > i {
				r.next--
			}
			return true
		}
	}
	return false
}

func (r *roundRobin[T]) len() int { return len(r.items) }

// pick returns the next endpoint in turn; the list must not be empty.
func (r *roundRobin[T]) pick() T {
	if r.next >= len(r.items) {
		r.next = 0
	}
	item := r.items[r.next]
	r.next++
	return item
}
