/**
 * Simulated time for the deterministic simulator: one global clock in milliseconds and a queue of
 * timers ordered by (due time, scheduling order), so equal due times fire in the order they were
 * scheduled and a run is a pure function of its seed. Nothing here reads a real clock.
 *
 * `NodeClock` is one node's view of time with a drift factor (local ms per true ms), for leases
 * once the witness arrives: a node measures durations only on its own clock, never compares
 * clocks across nodes.
 */

export interface Timer {
  readonly atMs: number
  readonly order: number
  readonly label: string
  run: () => void
  cancelled: boolean
}

export class SimClock {
  private current = 0
  private nextOrder = 0
  private readonly heap: Timer[] = []

  get nowMs(): number {
    return this.current
  }

  get pending(): number {
    return this.heap.length
  }

  /** Runs `run` after `delayMs` (>= 0) of true time. */
  schedule(delayMs: number, label: string, run: () => void): Timer {
    if (!(delayMs >= 0) || !Number.isFinite(delayMs)) throw new Error(`bad delay ${delayMs}`)
    const timer: Timer = {
      atMs: this.current + delayMs,
      order: this.nextOrder++,
      label,
      run,
      cancelled: false,
    }
    this.push(timer)
    return timer
  }

  cancel(timer: Timer): void {
    timer.cancelled = true
  }

  /** Fires the earliest timer; false when none is left. */
  runNext(): Timer | undefined {
    for (;;) {
      const timer = this.pop()
      if (timer === undefined) return undefined
      if (timer.cancelled) continue
      this.current = timer.atMs
      timer.run()
      return timer
    }
  }

  private before(a: Timer, b: Timer): boolean {
    return a.atMs < b.atMs || (a.atMs === b.atMs && a.order < b.order)
  }

  private push(timer: Timer): void {
    const heap = this.heap
    heap.push(timer)
    let i = heap.length - 1
    while (i > 0) {
      const parent = (i - 1) >> 1
      const p = heap[parent]
      if (p === undefined || !this.before(timer, p)) break
      heap[i] = p
      i = parent
    }
    heap[i] = timer
  }

  private pop(): Timer | undefined {
    const heap = this.heap
    const top = heap[0]
    const last = heap.pop()
    if (top === undefined || last === undefined || heap.length === 0) return top
    let i = 0
    for (;;) {
      const left = 2 * i + 1
      const right = left + 1
      let smallest = last
      let at = i
      const l = heap[left]
      const r = heap[right]
      if (l !== undefined && this.before(l, smallest)) {
        smallest = l
        at = left
      }
      if (r !== undefined && this.before(r, smallest)) {
        smallest = r
        at = right
      }
      if (at === i) break
      heap[i] = smallest
      i = at
    }
    heap[i] = last
    return top
  }
}

/** One node's clock: local time runs `driftFactor` times as fast as true time. */
export class NodeClock {
  constructor(
    private readonly clock: SimClock,
    readonly driftFactor: number,
  ) {
    if (!(driftFactor > 0)) throw new Error(`bad drift factor ${driftFactor}`)
  }

  get localNowMs(): number {
    return this.clock.nowMs * this.driftFactor
  }

  /** A timer measured on this node's clock: `localMs` of local time. */
  after(localMs: number, label: string, run: () => void): Timer {
    return this.clock.schedule(localMs / this.driftFactor, label, run)
  }
}
