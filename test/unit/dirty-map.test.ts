/** The dirty bitmap (src/replica/dirty-map.ts) against a byte-per-chunk model. */
import t from 'tap'
import { DirtyMap, mergeRanges } from '../../src/replica/dirty-map.js'
import { Prng, testSeed } from '../lib/prng.js'

const K = 1024

t.test('marks whole chunks, clears only covered ones, reports merged ranges', async (t) => {
  const map = new DirtyMap(1000 * K, 64 * K)
  t.ok(map.isEmpty)
  map.mark(10, 1)
  map.mark(64 * K, 64 * K + 1)
  t.same(map.ranges(), [{ offset: 0, length: 192 * K }])
  t.equal(map.dirtyBytes, 192 * K)
  map.clear(1, 64 * K)
  t.same(map.ranges(), [{ offset: 0, length: 192 * K }], 'a partly covered chunk stays dirty')
  map.clear(64 * K, 64 * K)
  t.same(map.ranges(), [
    { offset: 0, length: 64 * K },
    { offset: 128 * K, length: 64 * K },
  ])
  map.mark(999 * K, 1 * K)
  t.same(map.ranges()[2], { offset: 960 * K, length: 40 * K }, 'the last chunk is short')
  t.equal(map.dirtyBytes, 128 * K + 40 * K)
  map.clear(960 * K, 40 * K)
  t.equal(map.dirtyBytes, 128 * K, 'the short last chunk clears with a range to the end')
  t.ok(map.hasChanges)
  const bits = map.takeChanges()
  t.notOk(map.hasChanges)
  const loaded = new DirtyMap(1000 * K, 64 * K, bits)
  t.same(loaded.ranges(), map.ranges(), 'persisted bits load back')
  t.equal(bits.length, DirtyMap.bitsLength(1000 * K, 64 * K))
  t.throws(() => new DirtyMap(1000 * K, 64 * K, new Uint8Array(1)), /dirty bits/)
  loaded.clearAll()
  t.ok(loaded.isEmpty)
})

t.test('random marks and clears agree with a model', async (t) => {
  const seed = testSeed()
  const rng = new Prng(seed)
  for (let round = 0; round < 200; round++) {
    const chunk = 4 * K
    const size = (1 + rng.int(300)) * K
    const map = new DirtyMap(size, chunk)
    const chunks = Math.ceil(size / chunk)
    const model = new Array<boolean>(chunks).fill(false)
    for (let step = 0; step < 50; step++) {
      const offset = rng.int(size)
      const length = 1 + rng.int(size - offset)
      if (rng.bool(0.6)) {
        map.mark(offset, length)
        for (
          let c = Math.floor(offset / chunk);
          c <= Math.floor((offset + length - 1) / chunk);
          c++
        )
          model[c] = true
      } else {
        map.clear(offset, length)
        for (let c = 0; c < chunks; c++) {
          const start = c * chunk
          const end = Math.min(start + chunk, size)
          if (start >= offset && end <= offset + length) model[c] = false
        }
      }
    }
    const expected = mergeRanges(
      model.flatMap((dirty, c) =>
        dirty ? [{ offset: c * chunk, length: Math.min(chunk, size - c * chunk) }] : [],
      ),
    )
    if (JSON.stringify(map.ranges()) !== JSON.stringify(expected)) {
      t.fail(
        `seed ${seed} round ${round}: ${JSON.stringify(map.ranges())} != ${JSON.stringify(expected)}`,
      )
      return
    }
    t.equal(
      map.dirtyBytes,
      expected.reduce((sum, r) => sum + r.length, 0),
    )
  }
})

t.test('mergeRanges merges overlaps and neighbours', async (t) => {
  t.same(
    mergeRanges([
      { offset: 10, length: 5 },
      { offset: 0, length: 10 },
      { offset: 30, length: 0 },
      { offset: 12, length: 10 },
    ]),
    [{ offset: 0, length: 22 }],
  )
})
