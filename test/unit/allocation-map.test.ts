import t from 'tap'
import { AllocationMap } from '../../src/replica/allocation-map.js'
import { Prng, testSeed } from '../lib/prng.js'

const KiB = 1024
const chunk = 64 * KiB

void t.test('marks only chunks not yet allocated, and reports them', (t) => {
  const map = new AllocationMap({ sizeBytes: 16 * chunk, chunkBytes: chunk })
  t.same(map.chunksToMark(0, 4096), [0])
  t.same(map.chunksToMark(chunk - 1, 2), [0, 1], 'a write across a boundary touches both')
  t.same(map.markAllocated([1, 3]), [0], 'segment 0 changed')
  t.same(map.markAllocated([1]), [], 'no change, no segment to rewrite')
  t.same(map.chunksToMark(0, 5 * chunk), [0, 2, 4])
  t.ok(map.isAllocated(3))
  t.notOk(map.isAllocated(2))
  t.equal(map.allocatedChunkCount, 2)
  t.same(map.chunksToMark(0, 0), [], 'zero length touches nothing')
  t.end()
})

void t.test('trims free only fully covered chunks; the short last chunk counts at the end', (t) => {
  const map = new AllocationMap({ sizeBytes: 3 * chunk + 8 * KiB, chunkBytes: chunk })
  t.equal(map.chunkCount, 4)
  t.same(map.chunksFullyCovered(1, 2 * chunk), [1], 'misaligned start skips chunk 0')
  t.same(map.chunksFullyCovered(0, chunk - 1), [])
  t.same(map.chunksFullyCovered(chunk, 2 * chunk + 8 * KiB), [1, 2, 3], 'up to the end')
  t.same(map.chunksFullyCovered(3 * chunk, 4 * KiB), [], 'half of the short chunk is not all')
  t.end()
})

void t.test('extents: merged runs clipped to the range, holes read as zeros', (t) => {
  const map = new AllocationMap({ sizeBytes: 10 * chunk, chunkBytes: chunk })
  map.markAllocated([2, 3, 6])
  t.same(map.extents(0, 10 * chunk, 100), [
    { lengthBytes: 2 * chunk, hole: true, zero: true },
    { lengthBytes: 2 * chunk, hole: false, zero: false },
    { lengthBytes: 2 * chunk, hole: true, zero: true },
    { lengthBytes: chunk, hole: false, zero: false },
    { lengthBytes: 3 * chunk, hole: true, zero: true },
  ])
  t.same(
    map.extents(2 * chunk + 100, chunk, 100),
    [{ lengthBytes: chunk, hole: false, zero: false }],
    'inside one run',
  )
  t.same(map.extents(chunk + 10, chunk, 100), [
    { lengthBytes: chunk - 10, hole: true, zero: true },
    { lengthBytes: 10, hole: false, zero: false },
  ])
  t.same(
    map.extents(0, 10 * chunk, 2),
    [
      { lengthBytes: 2 * chunk, hole: true, zero: true },
      { lengthBytes: 2 * chunk, hole: false, zero: false },
    ],
    'at most extentsMax',
  )
  t.throws(() => map.extents(0, 11 * chunk, 1), 'beyond the end is a programmer error')
  t.end()
})

void t.test('extents agree with a bit-per-chunk model over many segments', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
  const prng = new Prng(seed)
  const chunkBytes = 4096
  const chunks = 3000
  const map = new AllocationMap({ sizeBytes: chunks * chunkBytes, chunkBytes, segmentChunks: 64 })
  const model: boolean[] = new Array<boolean>(chunks).fill(false)
  for (let round = 0; round < 300; round++) {
    const first = prng.int(chunks)
    const count = 1 + prng.int(Math.min(200, chunks - first))
    const run = Array.from({ length: count }, (_, i) => first + i)
    const value = prng.bool(0.6)
    if (value) map.markAllocated(run)
    else map.markUnallocated(run)
    for (const c of run) model[c] = value
    const offset = prng.int(chunks * chunkBytes)
    const length = prng.int(chunks * chunkBytes - offset) + 1
    let position = offset
    for (const extent of map.extents(offset, length, 1_000_000)) {
      t.ok(extent.lengthBytes > 0)
      for (let p = position; p < position + extent.lengthBytes; p += Math.min(chunkBytes, 512)) {
        if (model[Math.floor(p / chunkBytes)] === extent.hole) {
          t.fail(`round ${round}: extent at ${position} says hole=${extent.hole} at byte ${p}`)
          return
        }
      }
      position += extent.lengthBytes
    }
    t.equal(position, offset + length, `round ${round} covers the range`)
  }
  t.equal(map.allocatedChunkCount, model.filter(Boolean).length)
  t.end()
})

void t.test('segments round-trip; only changed segments are reported; empty ones vanish', (t) => {
  const options = { sizeBytes: 10_000 * 4096, chunkBytes: 4096, segmentChunks: 4096 }
  const map = new AllocationMap(options)
  t.equal(map.segmentCount, 3)
  t.equal(map.segmentBytes, 512)
  t.same(map.markAllocated([5, 4100, 9999]), [0, 1, 2])
  t.same(map.markAllocated([6, 7]), [0])
  const copy = new AllocationMap(options)
  for (const index of map.segmentIndexes()) {
    const bytes = map.encodeSegment(index)
    if (bytes === undefined) throw new Error('segment listed but empty')
    copy.loadSegment(index, bytes)
  }
  for (const c of [4, 5, 6, 7, 8, 4099, 4100, 9999])
    t.equal(copy.isAllocated(c), map.isAllocated(c))
  t.equal(copy.allocatedChunkCount, 5)
  t.same(map.markUnallocated([4100]), [1])
  t.equal(map.encodeSegment(1), undefined, 'an empty segment encodes as "delete the key"')
  t.same(map.segmentIndexes(), [0, 2])
  t.end()
})

void t.test('damaged segments are STORE_CORRUPT', (t) => {
  const map = new AllocationMap({ sizeBytes: 100 * 4096, chunkBytes: 4096, segmentChunks: 64 })
  t.throws(
    () => {
      map.loadSegment(0, new Uint8Array(7))
    },
    { code: 'STORE_CORRUPT' },
  )
  t.throws(
    () => {
      map.loadSegment(2, new Uint8Array(8))
    },
    { code: 'STORE_CORRUPT' },
  )
  const beyond = new Uint8Array(8)
  beyond[7] = 0x80 // chunk 64 + 63 = 127 > 99
  t.throws(
    () => {
      map.loadSegment(1, beyond)
    },
    { code: 'STORE_CORRUPT' },
  )
  t.end()
})
