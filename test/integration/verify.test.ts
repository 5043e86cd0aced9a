/**
 * `duplex volume verify`: compares the replicas online, finds a chunk that differs (a byte
 * flipped behind the node's back in the secondary's data file), and `--repair` makes them
 * identical again, while a writer keeps writing elsewhere.
 */
import fs from 'node:fs/promises'
import t from 'tap'
import { startPair } from '../lib/cluster.js'
import { duplex } from '../lib/node-process.js'
import { SteadyWriter } from '../lib/steady-writer.js'

const MiB = 1024 * 1024

t.test('verify finds a difference, repair removes it, under load', async (t) => {
  const pair = await startPair()
  t.teardown(() => pair.destroy())
  const writer = await SteadyWriter.start(pair.a.port, 'vol', 32 * MiB, 256)
  await writer.progress(100)
  const verify = (...extra: string[]) =>
    duplex(['volume', 'verify', 'vol', '--cluster', pair.clusterFile, '--output', 'json', ...extra])

  const clean = await verify()
  t.equal(clean.code, 0, clean.stderr)
  const cleanResult = JSON.parse(clean.stdout) as { differences: unknown[]; bytesCompared: number }
  t.same(cleanResult.differences, [], 'identical replicas, even with writes in flight')
  t.equal(cleanResult.bytesCompared, 64 * MiB)

  // Flip a byte in node-b's replica behind its back (bit rot, a bad disk).
  const file = await fs.open(await pair.dataFile('b'), 'r+')
  await file.write(Buffer.from([0x99]), 0, 1, 5 * MiB + 17)
  await file.close()

  const found = await verify()
  t.equal(found.code, 1, 'differences make the exit code 1')
  const foundResult = JSON.parse(found.stdout) as {
    differences: { offset: number; length: number }[]
  }
  t.same(
    foundResult.differences,
    [{ offset: 5 * MiB, length: MiB }],
    'the 1 MiB chunk holding the flipped byte',
  )

  const repaired = await verify('--repair')
  t.equal(repaired.code, 0, repaired.stderr)
  const repairedResult = JSON.parse(repaired.stdout) as {
    repairedBytes: number
    remaining: unknown[]
  }
  t.equal(repairedResult.repairedBytes, MiB)
  t.same(repairedResult.remaining, [])
  const again = await verify()
  t.equal(again.code, 0, 'identical afterwards')

  const table = await duplex(['volume', 'verify', 'vol', '--cluster', pair.clusterFile])
  t.match(table.stdout, /vol: compared 64\.0 MiB in 1\.0 MiB chunks; the replicas are identical/)
  const report = await writer.stop()
  t.equal(report.errors, 0, 'the writer never failed')
  t.same(await writer.verify(pair.b.port, 'vol'), [])
  const missing = await duplex(['volume', 'verify', 'nope', '--cluster', pair.clusterFile])
  t.equal(missing.code, 3, 'an unknown volume: exit code 3')
  t.match(missing.stderr, /no volume named nope/)
})
