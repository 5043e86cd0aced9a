/**
 * Orders overlapping operations on byte ranges of one volume.
 *
 * `RangeQueue` is the pure core (no I/O, no promises). Operations are admitted in arrival order
 * and each is either `running` or `waiting`:
 *
 * - Events: `submit(offset, length)` admits an op (or refuses it when `opsMax` are already
 *   admitted); `complete(id)` removes a running op and returns the ids that may now run.
 * - Rule: an op runs only when no earlier admitted op (running or still waiting) overlaps it.
 * - Invariants: no two overlapping ops run at once; among overlapping ops the order of running is
 *   the order of arrival (FIFO); non-overlapping ops do not wait for each other; every op runs
 *   once the ops before it complete, so none starves (a later op never overtakes an earlier
 *   overlapping one, even when it is small); at most `opsMax` ops are admitted.
 *
 * `RangeLock` is the thin promise wrapper used by drivers. When the queue is full, acquirers wait
 * in arrival order for admission; their number is bounded by the callers' own in-flight limits
 * (e.g. the NBD server's requests per connection).
 */
import { assert, assertSafeUint } from '../core/assert.js'

export const rangeQueueOpsMaxDefault = 4096

export type RangeOpState = 'running' | 'waiting'

export type SubmitResult = { state: RangeOpState; id: number } | { state: 'full' }

interface RangeOp {
  id: number
  start: number
  end: number
  state: RangeOpState
}

function overlaps(a: RangeOp, b: RangeOp): boolean {
  return a.start < b.end && b.start < a.end
}

export class RangeQueue {
  /** Admitted ops in arrival order. */
  private readonly ops: RangeOp[] = []
  private nextId = 1
  private running = 0

  constructor(readonly opsMax: number = rangeQueueOpsMaxDefault) {
    assert(Number.isSafeInteger(opsMax) && opsMax >= 1, 'opsMax must be >= 1')
  }

  get admittedCount(): number {
    return this.ops.length
  }

  get runningCount(): number {
    return this.running
  }

  get waitingCount(): number {
    return this.ops.length - this.running
  }

  /** Admits an op on [offset, offset + length); a zero-length op overlaps nothing. */
  submit(offset: number, length: number): SubmitResult {
    assertSafeUint(offset, 'offset')
    assertSafeUint(length, 'length')
    assertSafeUint(offset + length, 'range end')
    if (this.ops.length >= this.opsMax) return { state: 'full' }
    const op: RangeOp = { id: this.nextId++, start: offset, end: offset + length, state: 'waiting' }
    if (!this.ops.some((earlier) => overlaps(earlier, op))) {
      op.state = 'running'
      this.running += 1
    }
    this.ops.push(op)
    return { state: op.state, id: op.id }
  }

  /** Removes a running op; returns the ids that start running now, in arrival order. */
  complete(id: number): number[] {
    const index = this.ops.findIndex((op) => op.id === id)
    const done = this.ops[index]
    assert(done !== undefined, `range op ${id} is not admitted`)
    assert(done.state === 'running', `range op ${id} completed before it ran`)
    this.ops.splice(index, 1)
    this.running -= 1
    const started: number[] = []
    // Only ops that came after `done` and overlapped it can have been waiting for it.
    for (let i = index; i < this.ops.length; i++) {
      const op = this.ops[i]
      assert(op !== undefined)
      if (op.state !== 'waiting' || !overlaps(op, done)) continue
      if (this.blockedBefore(i, op)) continue
      op.state = 'running'
      this.running += 1
      started.push(op.id)
    }
    return started
  }

  stateOf(id: number): RangeOpState | undefined {
    return this.ops.find((op) => op.id === id)?.state
  }

  private blockedBefore(index: number, op: RangeOp): boolean {
    for (let i = 0; i < index; i++) {
      const earlier = this.ops[i]
      if (earlier !== undefined && overlaps(earlier, op)) return true
    }
    return false
  }
}

/** A held (or soon held) range. `waiting` is undefined when the range was free at once. */
export interface RangeHold {
  readonly waiting: Promise<void> | undefined
  /** Call exactly once, after `waiting` resolved, when the op is done. */
  release(): void
}

interface Parked {
  offset: number
  length: number
  admitted: (id: number, state: RangeOpState) => void
}

export class RangeLock {
  private readonly queue: RangeQueue
  private readonly wakers = new Map<number, () => void>()
  /** Acquirers refused by a full queue, in arrival order. */
  private readonly parked: Parked[] = []

  constructor(opsMax: number = rangeQueueOpsMaxDefault) {
    this.queue = new RangeQueue(opsMax)
  }

  get admittedCount(): number {
    return this.queue.admittedCount
  }

  /**
   * Holds [offset, offset + length). Returns synchronously; await `waiting` when it is defined.
   * Callers on a hot path skip the await when the range is free.
   */
  acquire(offset: number, length: number): RangeHold {
    const result =
      this.parked.length === 0 ? this.queue.submit(offset, length) : { state: 'full' as const }
    if (result.state === 'running') return this.hold(result.id, undefined)
    if (result.state === 'waiting') {
      const id = result.id
      return this.hold(id, new Promise<void>((resolve) => this.wakers.set(id, resolve)))
    }
    let id = 0
    const waiting = new Promise<void>((resolve) => {
      this.parked.push({
        offset,
        length,
        admitted: (admittedId, state) => {
          id = admittedId
          if (state === 'running') resolve()
          else this.wakers.set(admittedId, resolve)
        },
      })
    })
    return {
      waiting,
      release: once(() => {
        assert(id !== 0, 'released a range before it was admitted')
        this.complete(id)
      }),
    }
  }

  /** Runs `fn` holding the range. */
  async run<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const hold = this.acquire(offset, length)
    if (hold.waiting) await hold.waiting
    try {
      return await fn()
    } finally {
      hold.release()
    }
  }

  private hold(id: number, waiting: Promise<void> | undefined): RangeHold {
    return {
      waiting,
      release: once(() => {
        this.complete(id)
      }),
    }
  }

  private complete(id: number): void {
    for (const started of this.queue.complete(id)) {
      const wake = this.wakers.get(started)
      assert(wake !== undefined, `no waiter for range op ${started}`)
      this.wakers.delete(started)
      wake()
    }
    this.admitParked()
  }

  private admitParked(): void {
    while (this.parked.length > 0) {
      const next = this.parked[0]
      assert(next !== undefined)
      const result = this.queue.submit(next.offset, next.length)
      if (result.state === 'full') return
      this.parked.shift()
      next.admitted(result.id, result.state)
    }
  }
}

function once(fn: () => void): () => void {
  let called = false
  return () => {
    assert(!called, 'range released twice')
    called = true
    fn()
  }
}
