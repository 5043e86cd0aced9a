/**
 * Data outlives the process: after a clean restart, and after `kill -9` once a FLUSH (or a FUA
 * write) has been acknowledged. Also: the data directory is locked against a second node.
 */
import t from 'tap'
import { duplex, missingTools, run, startNode } from '../lib/node-process.js'

const skip = await missingTools(['qemu-io'])

t.test('data survives restart and kill -9 after flush', { skip: skip ?? false }, async (t) => {
  let node = await startNode({ volumes: [{ name: 'vol', size: '64M' }] })
  const dataDir = node.dataDir
  t.teardown(() => node.stop())

  let r = await run('qemu-io', [
    '-f',
    'raw',
    '-t',
    'none',
    '-c',
    'write -P 0x21 0 2M',
    node.uri('vol'),
  ])
  t.equal(r.code, 0, r.stderr)
  t.equal(await node.stop(), 0, 'clean stop exits 0')

  node = await startNode({ dataDir })
  r = await run('qemu-io', ['-f', 'raw', '-t', 'none', '-c', 'read -P 0x21 0 2M', node.uri('vol')])
  t.equal(r.code, 0, `after a clean restart: ${r.stdout}${r.stderr}`)

  r = await run('qemu-io', [
    '-f',
    'raw',
    '-t',
    'none',
    '-c',
    'write -P 0x42 4M 2M',
    '-c',
    'flush',
    node.uri('vol'),
  ])
  t.equal(r.code, 0, r.stderr)
  r = await run('qemu-io', [
    '-f',
    'raw',
    '-t',
    'writethrough',
    '-c',
    'write -P 0x43 8M 1M',
    node.uri('vol'),
  ])
  t.equal(r.code, 0, r.stderr)
  await node.kill()

  node = await startNode({ dataDir })
  r = await run('qemu-io', [
    '-f',
    'raw',
    '-t',
    'none',
    '-c',
    'read -P 0x42 4M 2M',
    '-c',
    'read -P 0x43 8M 1M',
    '-c',
    'read -P 0x21 0 2M',
    node.uri('vol'),
  ])
  t.equal(r.code, 0, `after kill -9: ${r.stdout}${r.stderr}`)
  const map = await run('nbdinfo', ['--map', '--json', node.uri('vol')])
  if (map.code === 0) {
    const extents = JSON.parse(map.stdout) as { offset: number; length: number; type: number }[]
    for (const [start, end] of [
      [0, 2],
      [4, 6],
      [8, 9],
    ] as const) {
      const covered = extents.some(
        (e) =>
          (e.type & 1) === 0 && e.offset <= start * 1048576 && e.offset + e.length >= end * 1048576,
      )
      t.ok(covered, `block status reports data over [${start}M, ${end}M) after the crash`)
    }
  }
})

t.test('a second node cannot open a locked data directory', async (t) => {
  const node = await startNode({ volumes: [{ name: 'vol', size: '16M' }] })
  t.teardown(() => node.stop())
  const second = await duplex(
    ['node', '--data-dir', node.dataDir, '--listen', '127.0.0.1:0'],
    20_000,
  )
  t.not(second.code, 0)
  t.match(second.stderr, /in use by another process/)
  // The running node still serves.
  const list = await duplex(['volume', 'list', '--data-dir', node.dataDir, '--output', 'json'])
  t.equal(list.code, 0, list.stderr)
  t.match(list.stdout, /"name": "vol"/)
})
