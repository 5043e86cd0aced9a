/** Generation histories (src/replica/history.ts): appending, bounding, and fork detection. */
import t from 'tap'
import { appendGeneration, describeFork, findFork } from '../../src/replica/history.js'
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

t.test('a fork is one generation with two owners', async (t) => {
  const common = [entry(1, 'a'), entry(2, 'b')]
  t.equal(findFork(common, common), undefined)
  t.equal(findFork([...common, entry(3, 'a')], common), undefined, 'one side ahead is no fork')
  const fork = findFork([...common, entry(3, 'a')], [...common, entry(3, 'b', true)])
  t.same(fork, { generation: 3, mine: entry(3, 'a'), theirs: entry(3, 'b', true) })
  if (fork !== undefined) {
    t.match(
      describeFork(fork),
      /generation 3 is owned by a here and by b \(forced by an admin\) on the peer/,
    )
    t.match(describeFork(fork), /duplex volume resolve VOLUME --keep NODE/)
  }
})
