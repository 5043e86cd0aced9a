/**
 * Proves ByteQueue hands out exactly the bytes pushed, in order, however the stream was split:
 * takes within one chunk are zero-copy views, takes across chunks are copied correctly, and skip
 * discards no more than asked or than is queued.
 */
import t from 'tap'
import { ByteQueue } from '../../src/nbd/byte-queue.js'
import { Prng, testSeed } from '../lib/prng.js'

void t.test('take within one chunk is a zero-copy view', (t) => {
  const q = new ByteQueue()
  const chunk = Buffer.from('abcdefgh')
  q.push(chunk)
  const a = q.take(3)
  t.equal(a.toString(), 'abc')
  t.equal(a.buffer, chunk.buffer, 'shares memory with the pushed chunk')
  t.equal(a.byteOffset, chunk.byteOffset)
  const b = q.take(5)
  t.equal(b.toString(), 'defgh')
  t.equal(b.buffer, chunk.buffer)
  t.equal(q.length, 0)
  t.end()
})

void t.test('take across chunk boundaries copies once and keeps the remainder', (t) => {
  const q = new ByteQueue()
  q.push(Buffer.from('ab'))
  q.push(Buffer.alloc(0))
  q.push(Buffer.from('cde'))
  q.push(Buffer.from('f'))
  t.equal(q.length, 6)
  t.equal(q.take(1).toString(), 'a')
  t.equal(q.take(4).toString(), 'bcde', 'spans three pushes')
  t.equal(q.length, 1)
  t.equal(q.take(1).toString(), 'f')
  t.equal(q.take(0).length, 0)
  t.throws(() => q.take(1), /beyond/)
  t.end()
})

void t.test('skip discards up to n and says how many', (t) => {
  const q = new ByteQueue()
  q.push(Buffer.from('abc'))
  q.push(Buffer.from('def'))
  t.equal(q.skip(2), 2)
  t.equal(q.skip(2), 2, 'across a boundary')
  t.equal(q.take(1).toString(), 'e')
  t.equal(q.skip(10), 1, 'only what is queued')
  t.equal(q.length, 0)
  t.equal(q.skip(5), 0)
  q.push(Buffer.from('xy'))
  t.equal(q.take(2).toString(), 'xy', 'usable after being emptied')
  t.end()
})

/** Pushes `stream` in random pieces while taking and skipping random amounts; returns a problem. */
function splitAndReadBack(rng: Prng, stream: Buffer): string | undefined {
  const q = new ByteQueue()
  const out: Buffer[] = []
  let pushed = 0
  let consumed = 0
  while (consumed < stream.length) {
    if (pushed < stream.length && (q.length === 0 || rng.bool())) {
      const n = Math.min(rng.int(300), stream.length - pushed)
      q.push(Buffer.from(stream.subarray(pushed, pushed + n)))
      pushed += n
    }
    const n = rng.int(Math.min(q.length, 400) + 1)
    if (rng.bool(0.2)) {
      const skipped = q.skip(n)
      if (skipped !== n) return `skip(${n}) returned ${skipped}`
      out.push(stream.subarray(consumed, consumed + n))
    } else {
      out.push(Buffer.from(q.take(n)))
    }
    consumed += n
    if (q.length !== pushed - consumed) return `length ${q.length} != ${pushed - consumed}`
  }
  return Buffer.concat(out).equals(stream) ? undefined : 'bytes differ'
}

void t.test('random splits of a stream read back identically', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (replay with DUPLEX_SEED=${seed})`)
  const rng = new Prng(seed)
  for (let round = 0; round < 200; round++) {
    const stream = Buffer.alloc(rng.int(5000))
    for (let i = 0; i < stream.length; i++) stream[i] = rng.int(256)
    t.equal(splitAndReadBack(rng, stream), undefined, `round ${round}, seed ${seed}`)
  }
  t.end()
})
