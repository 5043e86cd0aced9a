/** Generation histories (src/replica/history.ts): appending, bounding, and fork detection. */
import t from 'tap'
import {
  appendGeneration,
  describeFork,
  findFork,
  recordWithHistory,
} from '../../src/replica/history.js'
import { termsPerGeneration as G } from '../../src/core/epochs.js'
import { generationHistoryMax } from '../../src/replica/store.js'

const entry = (generation: number, owner: string, forced = false) => ({ generation, owner, forced })

t.test('append keeps one entry per generation, ordered and bounded', async (t) => {
  let history = appendGeneration([], entry(2, 'a'))
  history = appendGeneration(history, entry(1, 'b'))
  history = appendGeneration(history, entry(2, 'x'))
  t.same(history, [entry(1, 'b'), entry(2, 'a')], 'the first owner recorded for a generation stays')
  for (let g = 3; g < 100; g++) history = appendGeneration(history, entry(g, 'a'))
  t.equal(history.length, generationHistoryMax)
  t.equal(history[history.length - 1]?.generation, 99, 'the newest kept')
})

t.test('a fork: each side went on after the last generation they share', async (t) => {
  const common = [entry(1, 'a'), entry(2, 'b')]
  t.equal(findFork(common, common), undefined)
  t.equal(findFork([...common, entry(3, 'a')], common), undefined, 'one side ahead is no fork')
  t.equal(findFork([entry(1, 'a')], [...common, entry(4, 'b')]), undefined, 'nor far ahead')
  const fork = findFork([...common, entry(3, 'a')], [...common, entry(3, 'b', true)])
  t.same(fork, { common: 2, mine: entry(3, 'a'), theirs: entry(3, 'b', true) })
  if (fork !== undefined) {
    t.match(
      describeFork(fork),
      /generation 3 is owned by a here and by b \(forced by an admin\) on the peer/,
    )
    t.match(describeFork(fork), /duplex volume resolve VOLUME --keep NODE/)
  }
  // The witness gave generation 2 to a while an admin forced b into generation 3 (b never heard
  // of 2): different numbers, still a fork.
  const apart = findFork([entry(1, 'a'), entry(2, 'a')], [entry(1, 'a'), entry(3, 'b', true)])
  t.same(apart, { common: 1, mine: entry(2, 'a'), theirs: entry(3, 'b', true) })
  if (apart !== undefined) {
    t.match(
      describeFork(apart),
      /after generation 1, this replica went on in generation 2 \(a\) and the peer in generation 3 \(b \(forced by an admin\)\)/,
    )
  }
  // A sync target learned generation 3 from b without entering 2; b's description of itself may
  // even predate 3. One lineage, no fork (seed 525933 of the failover simulation).
  const skipped = [entry(1, 'a'), entry(3, 'b')]
  t.equal(findFork(skipped, [entry(1, 'a'), entry(2, 'b'), entry(3, 'b')]), undefined)
  t.equal(findFork(skipped, [entry(1, 'a'), entry(2, 'b')]), undefined, 'a stale description')
})

t.test('bounded histories compare only what both still hold', async (t) => {
  const long = Array.from({ length: 32 }, (_, index) => entry(index + 20, 'a'))
  t.equal(findFork([entry(1, 'a'), entry(5, 'b')], long), undefined, 'far behind, no fork')
  t.equal(findFork(long, [...long, entry(52, 'a')]), undefined)
  t.same(findFork([...long.slice(1), entry(52, 'b')], [...long, entry(53, 'a')])?.common, 51)
})

t.test('a generation enters the history once the replica holds its data', async (t) => {
  const start = { epoch: 1, primary: 'a', state: 'UpToDate' as const, history: [entry(0, 'a')] }
  // b's view: node-a ran alone in generation 1 (b learned it, Outdated), then an admin forced b.
  const learned = recordWithHistory(start, { epoch: G, primary: 'a', state: 'Outdated' })
  t.same(learned.history, [entry(0, 'a')], 'learning generation 1 while Outdated adds nothing')
  const forced = recordWithHistory(learned, { epoch: 2 * G, primary: 'b', state: 'UpToDate' }, true)
  t.same(forced.history, [entry(0, 'a'), entry(2, 'b', true)])
  // node-a's own history went on in generation 1: a fork, not a resync that drops a's writes.
  const ownerA = recordWithHistory(start, { epoch: G, primary: 'a', state: 'UpToDate' })
  t.same(ownerA.history, [entry(0, 'a'), entry(1, 'a')])
  t.same(findFork(ownerA.history ?? [], forced.history ?? [])?.common, 0)
  // A sync target lists the generation once its resync made it UpToDate in it.
  const synced = recordWithHistory(learned, { ...learned, state: 'UpToDate' })
  t.same(synced.history, [entry(0, 'a'), entry(1, 'a')])
  t.equal(findFork(synced.history ?? [], ownerA.history ?? []), undefined)
})
