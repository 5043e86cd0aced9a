import t from 'tap'
import { KiB, MiB } from '../../src/core/units.js'
import {
  bucketsPerWindow,
  followTheWriterDefaults,
  FollowTheWriter,
} from '../../src/replica/follow-the-writer.js'
import { Prng, testSeed } from '../lib/prng.js'

const { windowMs, holdMs, bytesMin } = followTheWriterDefaults

/** Every 100 ms over [fromMs, toMs) (100 ticks a window) the given bytes arrive from each source. */
function writeSteadily(
  policy: FollowTheWriter,
  perTick: { local?: number; forwarded?: number },
  fromMs: number,
  toMs: number,
): void {
  for (let now = fromMs; now < toMs; now += 100) {
    if (perTick.local !== undefined) policy.record(now, 'local', perTick.local)
    if (perTick.forwarded !== undefined) policy.record(now, 'forwarded', perTick.forwarded)
  }
}

t.test('moves when the peer has done nearly all the writing, once the hold is over', async (t) => {
  const policy = new FollowTheWriter(0)
  writeSteadily(policy, { forwarded: 2 * MiB, local: 100 * KiB }, 0, holdMs)
  // At the last tick the window holds exactly the last 100 ticks.
  t.same(policy.window(holdMs - 100), { localBytes: 10_000 * KiB, forwardedBytes: 200 * MiB })
  t.equal(policy.shouldMove(holdMs - 100), false, 'still holding')
  t.equal(policy.shouldMove(holdMs), true, 'the peer sent 95% of the window')
})

t.test('never during the hold, however dominant the peer', async (t) => {
  const policy = new FollowTheWriter(1000)
  for (let now = 1000; now < 1000 + holdMs; now += 100) {
    policy.record(now, 'forwarded', 100 * MiB)
    t.equal(policy.shouldMove(now), false)
  }
  t.equal(policy.shouldMove(1000 + holdMs), true)
})

t.test('not below bytesMin in the window', async (t) => {
  const policy = new FollowTheWriter(0)
  writeSteadily(policy, { forwarded: 600 * KiB }, 0, 2 * holdMs)
  const last = 2 * holdMs - 100
  t.equal(policy.window(last).forwardedBytes, 60_000 * KiB, 'under the 64 MiB floor')
  t.equal(policy.shouldMove(last), false)
  policy.record(last, 'forwarded', bytesMin - 60_000 * KiB)
  t.equal(policy.shouldMove(last), true, 'exactly bytesMin is enough')
})

t.test('not while local writes are more than 10% of the window', async (t) => {
  const policy = new FollowTheWriter(0)
  writeSteadily(policy, { forwarded: 890 * KiB, local: 110 * KiB }, 0, holdMs)
  t.same(policy.window(holdMs - 100), { localBytes: 11_000 * KiB, forwardedBytes: 89_000 * KiB })
  t.equal(policy.shouldMove(holdMs), false, '89% forwarded')
  writeSteadily(policy, { forwarded: 900 * KiB, local: 100 * KiB }, holdMs, holdMs + windowMs)
  const last = holdMs + windowMs - 100
  t.same(policy.window(last), { localBytes: 10_000 * KiB, forwardedBytes: 90_000 * KiB })
  t.equal(policy.shouldMove(last), true, 'exactly 90% forwarded')
})

t.test('old writes age out of the window', async (t) => {
  const policy = new FollowTheWriter(0)
  policy.record(holdMs, 'local', 500 * MiB)
  writeSteadily(policy, { forwarded: 10 * MiB }, holdMs, holdMs + windowMs / 2)
  const half = holdMs + windowMs / 2
  t.same(policy.window(half), { localBytes: 500 * MiB, forwardedBytes: 500 * MiB })
  t.equal(policy.shouldMove(half), false, 'the local burst is still counted')
  writeSteadily(policy, { forwarded: 10 * MiB }, half, holdMs + windowMs)
  // The window slides a bucket (1 s) at a time: at holdMs + windowMs it covers the last 9 s.
  t.same(policy.window(holdMs + windowMs), { localBytes: 0, forwardedBytes: 900 * MiB })
  t.equal(policy.shouldMove(holdMs + windowMs), true, 'a window later the burst is gone')
  t.same(policy.window(holdMs + 3 * windowMs), { localBytes: 0, forwardedBytes: 0 })
})

t.test('a write counts for between 0.9 and 1.0 windows', async (t) => {
  for (const at of [0, 1, 999, 1000, 1500, 12_345]) {
    const policy = new FollowTheWriter(at)
    policy.record(at, 'forwarded', 1)
    t.equal(policy.window(at + 0.9 * windowMs - 1).forwardedBytes, 1, `${at}: still in`)
    t.equal(policy.window(at + windowMs).forwardedBytes, 0, `${at}: out`)
  }
})

t.test('true at most once until reset, then a new hold', async (t) => {
  const policy = new FollowTheWriter(0)
  policy.record(holdMs, 'forwarded', bytesMin)
  t.equal(policy.shouldMove(holdMs), true)
  policy.record(holdMs + 1, 'forwarded', bytesMin)
  t.equal(policy.shouldMove(holdMs + 1), false, 'already said so')
  t.equal(policy.shouldMove(holdMs + 2000), false, 'still')
  policy.reset(holdMs + 2000)
  t.same(policy.window(holdMs + 2000), { localBytes: 0, forwardedBytes: 0 }, 'history forgotten')
  policy.record(holdMs + 2000, 'forwarded', bytesMin)
  t.equal(policy.shouldMove(2 * holdMs + 1999), false, 'holding again')
  policy.record(2 * holdMs + 2000, 'forwarded', bytesMin)
  t.equal(policy.shouldMove(2 * holdMs + 2000), true)
})

t.test('time going backwards counts as no time passed', async (t) => {
  const policy = new FollowTheWriter(0)
  policy.record(holdMs - 1000, 'forwarded', bytesMin)
  policy.record(0, 'local', 10 * MiB)
  t.same(policy.window(0), { localBytes: 10 * MiB, forwardedBytes: bytesMin }, 'counted as late')
  t.equal(policy.shouldMove(holdMs), false, 'so it counts against the move: 86% forwarded')
  policy.record(holdMs, 'forwarded', bytesMin)
  t.equal(policy.shouldMove(5), true, 'and a stale now does not bring the hold back')
})

t.test('options are checked', async (t) => {
  const bad = [
    { windowMs: 0 },
    { windowMs: Infinity },
    { holdMs: -1 },
    { bytesMin: NaN },
    { shareMin: 0.5 },
    { shareMin: 1.01 },
    { shareMin: NaN },
  ]
  for (const options of bad) {
    t.throws(
      () => new FollowTheWriter(0, options),
      { code: 'INVALID_ARGUMENT' },
      JSON.stringify(options),
    )
  }
  t.doesNotThrow(() => {
    new FollowTheWriter(0, { shareMin: 1, windowMs: 1, holdMs: 1, bytesMin: 1 })
  })
  t.throws(
    () => {
      new FollowTheWriter(0).record(0, 'local', -1)
    },
    { name: 'AssertionError' },
  )
  t.throws(() => new FollowTheWriter(0).shouldMove(NaN), { name: 'AssertionError' })
})

/**
 * A reference model: every write with its time, the window computed from the bucket rule the
 * module documents (buckets of windowMs / bucketsPerWindow, the current one and the nine before).
 */
class Model {
  private writes: { timeMs: number; local: number; forwarded: number }[] = []
  private nowMs: number
  private holdUntilMs: number
  private decided = false

  constructor(
    nowMs: number,
    private readonly options: {
      windowMs: number
      holdMs: number
      bytesMin: number
      shareMin: number
    },
  ) {
    this.nowMs = nowMs
    this.holdUntilMs = nowMs + options.holdMs
  }

  record(nowMs: number, source: 'local' | 'forwarded', bytes: number): void {
    this.nowMs = Math.max(this.nowMs, nowMs)
    this.writes.push({
      timeMs: this.nowMs,
      local: source === 'local' ? bytes : 0,
      forwarded: source === 'forwarded' ? bytes : 0,
    })
  }

  window(nowMs: number): { localBytes: number; forwardedBytes: number } {
    this.nowMs = Math.max(this.nowMs, nowMs)
    const bucketMs = this.options.windowMs / bucketsPerWindow
    const newest = Math.floor(this.nowMs / bucketMs)
    let localBytes = 0
    let forwardedBytes = 0
    for (const write of this.writes) {
      if (Math.floor(write.timeMs / bucketMs) > newest - bucketsPerWindow) {
        localBytes += write.local
        forwardedBytes += write.forwarded
      }
    }
    return { localBytes, forwardedBytes }
  }

  /** Whether a move is allowed now: the property shouldMove must respect. */
  allowed(nowMs: number): boolean {
    const { localBytes, forwardedBytes } = this.window(nowMs)
    const share = forwardedBytes / (localBytes + forwardedBytes)
    return (
      !this.decided &&
      this.nowMs >= this.holdUntilMs &&
      forwardedBytes >= this.options.bytesMin &&
      share >= this.options.shareMin
    )
  }

  moved(value: boolean): void {
    if (value) this.decided = true
  }

  reset(nowMs: number): void {
    this.nowMs = Math.max(this.nowMs, nowMs)
    this.writes = []
    this.holdUntilMs = this.nowMs + this.options.holdMs
    this.decided = false
  }
}

t.test('randomized: shouldMove is true exactly when the window allows it', async (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (replay with DUPLEX_SEED=${seed})`)
  const prng = new Prng(seed)
  let moves = 0
  let refusedForShare = 0
  let failures = 0
  for (let run = 0; run < 200 && failures === 0; run++) {
    const options = {
      windowMs: 1000 + prng.int(20_000),
      holdMs: 1 + prng.int(30_000),
      bytesMin: 1 + prng.int(64 * MiB),
      shareMin: 0.51 + prng.next() * 0.49,
    }
    const forwardedProbability = prng.next()
    let now = prng.int(1_000_000)
    const policy = new FollowTheWriter(now, options)
    const model = new Model(now, options)
    for (let step = 0; step < 2000; step++) {
      now += prng.bool(0.02) ? -prng.int(5000) : prng.int(200)
      const action = prng.int(100)
      if (action < 80) {
        const source = prng.bool(forwardedProbability) ? 'forwarded' : 'local'
        const bytes = prng.int(4 * MiB)
        policy.record(now, source, bytes)
        model.record(now, source, bytes)
      } else if (action < 99) {
        const allowed = model.allowed(now)
        const got = policy.shouldMove(now)
        model.moved(got)
        const { localBytes, forwardedBytes } = model.window(now)
        const shareTooLow = forwardedBytes < options.shareMin * (localBytes + forwardedBytes)
        if (shareTooLow) refusedForShare++
        if (got) moves++
        if (got && shareTooLow) {
          failures++
          t.fail(`run ${run} step ${step}: moved with a forwarded share below shareMin`)
          break
        }
        if (got !== allowed) {
          failures++
          t.fail(`run ${run} step ${step}: shouldMove ${got}, model ${allowed}`, { options })
          break
        }
        const window = policy.window(now)
        if (window.localBytes !== localBytes || window.forwardedBytes !== forwardedBytes) {
          failures++
          t.fail(`run ${run} step ${step}: window differs from the model`, { window })
          break
        }
      } else {
        policy.reset(now)
        model.reset(now)
      }
    }
  }
  t.equal(failures, 0, 'shouldMove never disagrees with the window')
  t.ok(moves > 0, `the runs did move (${moves} moves)`)
  t.ok(refusedForShare > 0, `and did refuse for the share (${refusedForShare} times)`)
})
