import t from 'tap'
import { RangeLock, RangeQueue } from '../../src/replica/range-lock.js'
import { Prng, testSeed } from '../lib/prng.js'

function admitted(result: ReturnType<RangeQueue['submit']>): number {
  if (result.state === 'full') throw new Error('queue full')
  return result.id
}

void t.test('transcript: overlapping ops wait, disjoint ones run, FIFO among overlaps', (t) => {
  const q = new RangeQueue(8)
  const a = q.submit(0, 100)
  t.same(a, { state: 'running', id: 1 })
  t.same(q.submit(100, 100), { state: 'running', id: 2 }, 'adjacent is disjoint')
  t.same(q.submit(50, 100), { state: 'waiting', id: 3 }, 'overlaps 1 and 2')
  t.same(q.submit(300, 10), { state: 'running', id: 4 })
  t.same(q.submit(140, 1), { state: 'waiting', id: 5 }, 'overlaps 2 and the waiting 3')
  t.same(q.submit(0, 0), { state: 'running', id: 6 }, 'zero length overlaps nothing')
  t.same(q.complete(1), [], '3 still waits for 2')
  t.same(q.complete(2), [3], '5 still waits for 3, which came first')
  t.equal(q.stateOf(5), 'waiting')
  t.same(q.complete(3), [5])
  t.throws(() => q.complete(3), 'completing twice is a programmer error')
  t.equal(q.runningCount, 3)
  t.equal(q.waitingCount, 0)
  t.end()
})

void t.test('a small late op does not overtake an earlier overlapping waiter', (t) => {
  const q = new RangeQueue(8)
  const big = admitted(q.submit(0, 1000))
  const waiter = admitted(q.submit(0, 2000))
  const late = admitted(q.submit(1500, 10))
  t.equal(q.stateOf(late), 'waiting', 'it overlaps the waiting op, so it queues behind it')
  t.same(q.complete(big), [waiter])
  t.same(q.complete(waiter), [late])
  t.end()
})

void t.test('bounded: refuses past opsMax, admits again after a completion', (t) => {
  const q = new RangeQueue(2)
  const first = admitted(q.submit(0, 1))
  admitted(q.submit(0, 1))
  t.same(q.submit(10, 1), { state: 'full' })
  q.complete(first)
  t.equal(q.submit(10, 1).state, 'running')
  t.end()
})

void t.test('property: exclusion, liveness and FIFO under random arrivals and completions', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
  const prng = new Prng(seed)
  for (let run = 0; run < 50; run++) {
    const q = new RangeQueue(32)
    const ranges = new Map<number, { start: number; end: number; arrival: number }>()
    const running = new Set<number>()
    const startOrder: number[] = []
    let arrivals = 0
    let submitted = 0
    const check = (started: number[]): void => {
      for (const id of started) {
        const op = ranges.get(id)
        if (op === undefined) throw new Error(`unknown op ${id}`)
        for (const other of running) {
          const o = ranges.get(other)
          if (o && o.start < op.end && op.start < o.end) {
            t.fail(`run ${run}: ${id} started while overlapping ${other} runs`)
          }
        }
        running.add(id)
        startOrder.push(id)
      }
    }
    while (submitted < 300 || running.size > 0) {
      if (submitted < 300 && (running.size === 0 || prng.bool(0.55))) {
        const start = prng.int(1000)
        const length = 1 + prng.int(100)
        const result = q.submit(start, length)
        if (result.state === 'full') {
          t.equal(q.admittedCount, 32, 'full only at opsMax')
          const ids = [...running]
          const id = ids[prng.int(ids.length)]
          if (id === undefined) throw new Error(`run ${run}: full with nothing running (deadlock)`)
          running.delete(id)
          check(q.complete(id))
          continue
        }
        submitted += 1
        ranges.set(result.id, { start, end: start + length, arrival: arrivals++ })
        check(result.state === 'running' ? [result.id] : [])
      } else {
        const ids = [...running]
        const id = ids[prng.int(ids.length)]
        if (id === undefined) break
        running.delete(id)
        check(q.complete(id))
      }
    }
    t.equal(q.admittedCount, 0, `run ${run}: every op ran and completed`)
    t.equal(startOrder.length, submitted)
    const startedAt = new Map(startOrder.map((id, index) => [id, index]))
    let fifoViolations = 0
    for (const [a, ra] of ranges) {
      for (const [b, rb] of ranges) {
        const overlap = ra.start < rb.end && rb.start < ra.end
        if (
          overlap &&
          ra.arrival < rb.arrival &&
          (startedAt.get(a) ?? 0) > (startedAt.get(b) ?? 0)
        ) {
          fifoViolations += 1
        }
      }
    }
    t.equal(fifoViolations, 0, `run ${run}: overlapping ops start in arrival order`)
  }
  t.end()
})

void t.test(
  'RangeLock: free ranges need no await; waiters wake in order; full queue parks',
  async (t) => {
    const lock = new RangeLock(2)
    const events: string[] = []
    const a = lock.acquire(0, 10)
    t.equal(a.waiting, undefined, 'a free range is held at once')
    const b = lock.acquire(5, 10)
    t.ok(b.waiting, 'an overlapping range waits')
    const c = lock.acquire(100, 1)
    t.ok(c.waiting, 'the queue is full (2): parked')
    t.equal(lock.admittedCount, 2)
    if (b.waiting === undefined || c.waiting === undefined) throw new Error('expected waiting')
    const done = [
      b.waiting.then(() => {
        events.push('b')
      }),
      c.waiting.then(() => {
        events.push('c')
      }),
    ]
    await Promise.resolve()
    t.same(events, [], 'nobody runs before a release')
    a.release()
    await Promise.all(done)
    t.same(events, ['b', 'c'])
    t.throws(() => {
      a.release()
    }, 'releasing twice is a programmer error')
    b.release()
    c.release()
    t.equal(lock.admittedCount, 0)
    t.equal(await lock.run(0, 1, () => Promise.resolve(42)), 42)
  },
)
t.end()
