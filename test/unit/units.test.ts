import t from 'tap'
import { formatSize, parseSize, GiB, MiB } from '../../src/core/units.js'

t.test('parseSize reads the forms admins type', async (t) => {
  t.equal(parseSize('4096'), 4096)
  t.equal(parseSize('50G'), 50 * GiB)
  t.equal(parseSize('512MiB'), 512 * MiB)
  t.equal(parseSize('1.5g'), 1.5 * GiB)
})

t.test('parseSize rejects what it cannot read, with the accepted forms', async (t) => {
  for (const bad of ['', 'G', '-1G', '12Q', '1e3', '0.3']) {
    t.throws(() => parseSize(bad), { code: 'INVALID_ARGUMENT' }, bad)
  }
})

t.test('formatSize', async (t) => {
  t.equal(formatSize(512), '512 B')
  t.equal(formatSize(GiB), '1.0 GiB')
})
