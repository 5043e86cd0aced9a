import t from 'tap'
import { execFile } from 'node:child_process'
import { mkdtemp, readdir, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { RocksMetaStore } from '../../src/replica/meta-store.js'
import { NodeStore } from '../../src/replica/store.js'
import type { Volume } from '../../src/replica/volume.js'
import { Prng, testSeed } from '../lib/prng.js'

const KiB = 1024
const MiB = 1024 * KiB
const chunk = 64 * KiB
const run = promisify(execFile)

async function tempDir(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'duplex-store-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  return dir
}

function volumeOf(store: NodeStore, name: string): Volume {
  const volume = store.get(name)
  if (volume === undefined) throw new Error(`no volume ${name}`)
  return volume
}

function pattern(length: number, seed: number): Buffer {
  const buffer = Buffer.alloc(length)
  for (let i = 0; i < length; i++) buffer[i] = (seed + i * 7) % 251 || 1
  return buffer
}

const noZeroFlags = { fua: false, noHole: false, fastZero: false }

void t.test('create, list, find, delete, with clear validation errors', async (t) => {
  const dir = await tempDir(t)
  const store = await NodeStore.open(dir)
  t.teardown(() => store.close().catch(() => undefined))
  const record = await store.create('vol-1', 4 * MiB)
  t.match(record, { name: 'vol-1', sizeBytes: 4 * MiB, id: /^[0-9a-f]{16}$/ })
  await store.create('a.b_c', 4096)
  t.same(
    store.list().map((v) => [v.name, v.sizeBytes, v.attachedClients]),
    [
      ['a.b_c', 4096, 0],
      ['vol-1', 4 * MiB, 0],
    ],
  )
  t.equal(store.find('vol-1')?.sizeBytes, 4 * MiB)
  const file = join(dir, 'volumes', `${record.id}.data`)
  const info = await stat(file)
  t.equal(info.size, 4 * MiB, 'the data file is as long as the volume')
  t.ok(info.blocks * 512 < 4 * MiB, 'and sparse')

  for (const bad of ['', 'Vol', '-x', 'a/b', 'x'.repeat(65), 'a b']) {
    await t.rejects(store.create(bad, 4096), { code: 'INVALID_ARGUMENT', message: /a-z, 0-9/ }, bad)
  }
  for (const bad of [0, 4095, 4097, -4096, 2 ** 50 + 4096, 1.5]) {
    await t.rejects(
      store.create('ok', bad),
      { code: 'INVALID_ARGUMENT', message: /multiple of 4 KiB/ },
      String(bad),
    )
  }
  await t.rejects(store.create('vol-1', 4096), { code: 'VOLUME_EXISTS' })
  await t.rejects(store.delete('nope'), { code: 'VOLUME_NOT_FOUND' })

  const first = store.attach('vol-1')
  const second = store.attach('vol-1')
  t.equal(store.attach('nope'), undefined)
  t.equal(store.list().find((v) => v.name === 'vol-1')?.attachedClients, 2)
  await t.rejects(store.delete('vol-1'), { code: 'VOLUME_BUSY', message: /2 clients are attached/ })
  first?.detach()
  first?.detach() // idempotent
  await t.rejects(store.delete('vol-1'), { code: 'VOLUME_BUSY', message: /1 client is attached/ })
  second?.detach()
  await store.delete('vol-1')
  t.equal(store.find('vol-1'), undefined)
  t.same(await readdir(join(dir, 'volumes')), [`${volumeOf(store, 'a.b_c').id}.data`])
  await store.close()

  const reopened = await NodeStore.open(dir)
  t.same(
    reopened.list().map((v) => v.name),
    ['a.b_c'],
    'the deletion and creation survive a reopen',
  )
  await reopened.close()
})

void t.test(
  'the data directory is locked against a second open, here and in another process',
  async (t) => {
    const dir = await tempDir(t)
    const store = await NodeStore.open(dir)
    await t.rejects(NodeStore.open(dir), {
      code: 'STORE_LOCKED',
      message: /is in use by another process \(is a duplex node already running\?\)/,
    })
    const storeUrl = new URL('../../src/replica/store.js', import.meta.url).href
    const script = `
    const { NodeStore } = await import(${JSON.stringify(storeUrl)})
    try { await NodeStore.open(${JSON.stringify(dir)}); console.log('opened') }
    catch (error) { console.log(error.code) }`
    const child = await run(process.execPath, ['--input-type=module', '-e', script])
    t.equal(child.stdout.trim(), 'STORE_LOCKED', 'a child process is refused')
    await store.close()
    const again = await run(process.execPath, ['--input-type=module', '-e', script])
    t.equal(again.stdout.trim(), 'opened', 'and admitted once the lock is released')
  },
)

void t.test(
  'data and allocation survive close and reopen; trims and zeros read back zeros',
  async (t) => {
    const dir = await tempDir(t)
    let store = await NodeStore.open(dir, { chunkBytes: chunk })
    await store.create('v', 2 * MiB)
    let volume = volumeOf(store, 'v')
    const a = pattern(8 * KiB, 3)
    await volume.write(chunk - 4 * KiB, a, false) // across chunks 0 and 1
    await volume.write(5 * chunk, pattern(chunk, 9), true)
    await volume.zero(10 * chunk, 3 * chunk, { fua: false, noHole: true, fastZero: false })
    await volume.flush()
    t.same(await volume.allocation(0, 2 * MiB, 100), [
      { lengthBytes: 2 * chunk, hole: false, zero: false },
      { lengthBytes: 3 * chunk, hole: true, zero: true },
      { lengthBytes: chunk, hole: false, zero: false },
      { lengthBytes: 4 * chunk, hole: true, zero: true },
      { lengthBytes: 3 * chunk, hole: false, zero: false },
      { lengthBytes: 19 * chunk, hole: true, zero: true },
    ])
    await store.close()

    // Reopened with the default chunk size: the volume keeps the one it was created with.
    store = await NodeStore.open(dir)
    volume = volumeOf(store, 'v')
    t.equal(volume.record.allocationChunkBytes, chunk, 'chunk size is part of the record')
    t.same(await volume.read(chunk - 4 * KiB, 8 * KiB), a, 'data survives')
    t.same(await volume.read(10 * chunk, 3 * chunk), Buffer.alloc(3 * chunk))
    t.same((await volume.allocation(0, 2 * MiB, 100)).length, 6, 'allocation survives')

    await volume.trim(5 * chunk + 100, 4 * KiB, false)
    t.same(await volume.read(5 * chunk + 100, 4 * KiB), Buffer.alloc(4 * KiB), 'trim reads zeros')
    t.same(await volume.read(5 * chunk, 100), pattern(chunk, 9).subarray(0, 100), 'around it stays')
    t.match(await volume.allocation(5 * chunk, chunk, 10), [{ hole: false, lengthBytes: chunk }])
    await volume.zero(0, 2 * chunk, noZeroFlags)
    t.same(await volume.read(0, 2 * chunk), Buffer.alloc(2 * chunk), 'zero reads zeros')
    t.same(await volume.allocation(0, 3 * chunk, 10), [
      { lengthBytes: 3 * chunk, hole: true, zero: true },
    ])
    await t.rejects(volume.zero(0, 4096, { fua: false, noHole: true, fastZero: true }), {
      code: 'NOT_SUPPORTED',
    })
    await volume.zero(0, 4096, { fua: true, noHole: false, fastZero: true }) // punching is fast
    await store.close()
  },
)

void t.test('zeroing and trimming up to 4 GiB - 1 apply in full', async (t) => {
  const dir = await tempDir(t)
  const store = await NodeStore.open(dir)
  t.teardown(() => store.close())
  await store.create('big', 8 * 1024 * MiB)
  const volume = volumeOf(store, 'big')
  const length = 2 ** 32 - 4096
  const marks = [100, 2 * 1024 * MiB, length - 200]
  for (const offset of marks) await volume.write(offset, Buffer.from('data!'), false)
  await volume.zero(0, length, noZeroFlags)
  for (const offset of marks) t.same(await volume.read(offset, 5), Buffer.alloc(5), `${offset}`)
  await volume.write(length + 10, Buffer.from('keep'), false)
  await volume.trim(0, 2 ** 32 - 1, false)
  t.same(await volume.read(length + 10, 4), Buffer.alloc(4), 'the trim reached its last bytes')
})

void t.test('concurrent first writes share synced allocation batches (group commit)', async (t) => {
  const dir = await tempDir(t)
  const store = await NodeStore.open(dir)
  t.teardown(() => store.close())
  await store.create('g', 64 * MiB)
  const volume = volumeOf(store, 'g')
  const before = volume.allocationSyncCount
  await Promise.all(
    Array.from({ length: 32 }, (_, i) => volume.write(i * 2 * chunk, pattern(4096, i), false)),
  )
  const batches = volume.allocationSyncCount - before
  t.ok(batches >= 1 && batches <= 3, `32 first writes took ${batches} synced batches`)
  await Promise.all(
    Array.from({ length: 16 }, (_, i) => volume.write(4096 * i, pattern(4096, i), false)),
  )
  t.ok(volume.allocationSyncCount - before <= batches + 1, 'writes into one chunk share a mark')
  const again = volume.allocationSyncCount
  await volume.write(8192, pattern(4096, 1), false)
  t.equal(volume.allocationSyncCount, again, 'a write into an allocated chunk syncs no metadata')
})

void t.test(
  'random writes, trims and zeros: block status never reports a hole over data',
  async (t) => {
    const seed = testSeed()
    t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
    const prng = new Prng(seed)
    const dir = await tempDir(t)
    let store = await NodeStore.open(dir)
    const sizeBytes = 4 * MiB
    await store.create('r', sizeBytes)
    let volume = volumeOf(store, 'r')
    const model = Buffer.alloc(sizeBytes)
    for (let round = 0; round < 40; round++) {
      // A batch of concurrent ops on disjoint ranges (overlapping ones would have no single answer
      // in the model), then a check of every extent against the bytes.
      const taken: [number, number][] = []
      const ops: Promise<void>[] = []
      for (let i = 0; i < 12; i++) {
        const offset = prng.int(sizeBytes / 512) * 512
        const length = Math.min(
          sizeBytes - offset,
          (1 + prng.int(64)) * 512 * (prng.bool(0.2) ? 8 : 1),
        )
        if (taken.some(([s, e]) => offset < e && s < offset + length)) continue
        taken.push([offset, offset + length])
        const kind = prng.int(4)
        if (kind <= 1) {
          const data = pattern(length, prng.int(250))
          data.copy(model, offset)
          ops.push(volume.write(offset, data, prng.bool(0.1)))
        } else {
          model.fill(0, offset, offset + length)
          if (kind === 2) ops.push(volume.trim(offset, length, false))
          else ops.push(volume.zero(offset, length, { ...noZeroFlags, noHole: prng.bool(0.3) }))
        }
      }
      await Promise.all(ops)
      if (round === 20) {
        await store.close()
        store = await NodeStore.open(dir)
        volume = volumeOf(store, 'r')
      }
      const content = await volume.read(0, sizeBytes)
      if (!content.equals(model)) {
        t.fail(`round ${round}: content differs from the model`)
        break
      }
      const fileContent = await readFile(join(dir, 'volumes', `${volume.id}.data`))
      t.ok(fileContent.equals(model), `round ${round}: the file holds the model`)
      let position = 0
      let holeOverData = 0
      for (const extent of await volume.allocation(0, sizeBytes, 1_000_000)) {
        const bytes = content.subarray(position, position + extent.lengthBytes)
        if ((extent.hole || extent.zero) && bytes.some((b) => b !== 0)) holeOverData += 1
        position += extent.lengthBytes
      }
      t.equal(position, sizeBytes, `round ${round}: extents cover the volume`)
      t.equal(holeOverData, 0, `round ${round}: no hole or zero extent over data`)
    }
    await store.close()
  },
)

void t.test(
  'open removes orphan data files and reports a missing one as STORE_CORRUPT',
  async (t) => {
    const dir = await tempDir(t)
    let store = await NodeStore.open(dir)
    const { id } = await store.create('v', MiB)
    await store.close()
    const orphan = join(dir, 'volumes', '0123456789abcdef.data')
    await writeFile(orphan, 'left by a crash')
    store = await NodeStore.open(dir)
    t.same(store.openReport.orphanFilesRemoved, ['0123456789abcdef.data'])
    t.same((await readdir(join(dir, 'volumes'))).sort(), [`${id}.data`])
    await store.close()
    await unlink(join(dir, 'volumes', `${id}.data`))
    await t.rejects(NodeStore.open(dir), {
      code: 'STORE_CORRUPT',
      message: /data file .* is missing/,
    })
    const retry = run(process.execPath, [
      '--input-type=module',
      '-e',
      `const { NodeStore } = await import(${JSON.stringify(new URL('../../src/replica/store.js', import.meta.url).href)})
     await NodeStore.open(${JSON.stringify(dir)}).catch((e) => console.log(e.code))`,
    ])
    t.equal((await retry).stdout.trim(), 'STORE_CORRUPT', 'a failed open released the lock')
  },
)

void t.test('close waits for ops in flight and refuses new ones', async (t) => {
  const dir = await tempDir(t)
  const store = await NodeStore.open(dir)
  await store.create('c', 16 * MiB)
  const volume = volumeOf(store, 'c')
  const writes = Array.from({ length: 16 }, (_, i) => volume.write(i * MiB, pattern(MiB, i), false))
  const closing = volume.close()
  await t.rejects(volume.read(0, 1), { code: 'SHUTTING_DOWN' })
  await t.rejects(volume.flush(), { code: 'SHUTTING_DOWN' })
  await Promise.all(writes)
  await closing
  await store.close()
  const reopened = await NodeStore.open(dir)
  t.same(await volumeOf(reopened, 'c').read(15 * MiB, MiB), pattern(MiB, 15))
  await reopened.close()
})

void t.test(
  'synced metadata batches do not block the event loop (RocksDB runs in a worker)',
  async (t) => {
    const dir = await tempDir(t)
    const meta = await RocksMetaStore.open(join(dir, 'meta'))
    t.teardown(() => meta.close())
    const batches = 50
    await meta.batch([{ type: 'put', key: 'bench/warm-up', value: Buffer.alloc(1) }], {
      sync: true,
    })
    // Every tick of a 1 ms timer, plus the start and end: a blocked loop shows as one long gap.
    const ticks: number[] = []
    const timer = setInterval(() => ticks.push(performance.now()), 1)
    const startMs = performance.now()
    ticks.push(startMs)
    try {
      for (let i = 0; i < batches; i++) {
        const value = Buffer.alloc(64, i)
        await meta.batch([{ type: 'put', key: `bench/${i % 4}`, value }], { sync: true })
      }
    } finally {
      clearInterval(timer)
    }
    const endMs = performance.now()
    ticks.push(endMs)
    const totalMs = endMs - startMs
    let gapMsMax = 0
    for (let i = 1; i < ticks.length; i++) {
      gapMsMax = Math.max(gapMsMax, (ticks[i] ?? 0) - (ticks[i - 1] ?? 0))
    }
    t.comment(
      `${batches} synced batches in ${totalMs.toFixed(1)} ms, longest gap ${gapMsMax.toFixed(1)} ms`,
    )
    // In-thread, the loop cannot tick between back-to-back batches: the gap equals the total.
    t.ok(gapMsMax < totalMs / 3, 'the timer kept ticking during the batches')
    t.same(await meta.get('bench/1'), Buffer.alloc(64, 49), 'and the last batch is readable')
  },
)

void t.test('grow: data kept, the new bytes read as zeros, only without clients', async (t) => {
  const dir = await tempDir(t)
  const store = await NodeStore.open(dir)
  t.teardown(() => store.close().catch(() => undefined))
  await store.create('g', 4 * MiB)
  const data = pattern(64 * KiB, 3)
  await volumeOf(store, 'g').write(4 * MiB - data.length, data, true)
  await store.setDirtyBits('g', new Uint8Array([0xff, 0x01, 0, 0, 0, 0, 0, 0]), true)

  const attachment = store.attach('g')
  await t.rejects(store.grow('g', 8 * MiB), { code: 'VOLUME_BUSY' }, 'not under a client')
  attachment?.detach()
  await t.rejects(store.grow('g', 2 * MiB), { code: 'INVALID_ARGUMENT', message: /only grow/ })
  await t.rejects(store.grow('g', 8 * MiB + 1), { code: 'INVALID_ARGUMENT' }, 'not 4 KiB aligned')
  await t.rejects(store.grow('nope', 8 * MiB), { code: 'VOLUME_NOT_FOUND' })

  await store.grow('g', 8 * MiB)
  const grown = volumeOf(store, 'g')
  t.equal(grown.info.sizeBytes, 8 * MiB)
  t.same(await grown.read(4 * MiB - data.length, data.length), data, 'the old data is there')
  t.same(await grown.read(4 * MiB, 64 * KiB), Buffer.alloc(64 * KiB), 'the new bytes are zeros')
  t.match(await grown.allocation(4 * MiB, 4 * MiB, 16), [{ hole: true, lengthBytes: 4 * MiB }])
  await grown.write(8 * MiB - 4096, pattern(4096, 9), true)
  const bits = await store.dirtyBits('g')
  t.equal(bits?.length, 16, 'the dirty bitmap covers the new size')
  t.same([...(bits ?? [])].slice(0, 3), [0xff, 0x01, 0], 'and keeps its marks')
  await store.close()

  const reopened = await NodeStore.open(dir)
  t.teardown(() => reopened.close().catch(() => undefined))
  const again = volumeOf(reopened, 'g')
  t.equal(again.info.sizeBytes, 8 * MiB, 'the new size is durable')
  t.same(await again.read(8 * MiB - 4096, 4096), pattern(4096, 9))
  await reopened.close()

  // A grow that stopped after the file grew but before its record: cut back at open.
  const [file] = (await readdir(join(dir, 'volumes'))).filter((name) => name.endsWith('.data'))
  await run('truncate', ['-s', String(12 * MiB), join(dir, 'volumes', file ?? '')])
  const recovered = await NodeStore.open(dir)
  t.teardown(() => recovered.close().catch(() => undefined))
  t.equal(volumeOf(recovered, 'g').info.sizeBytes, 8 * MiB)
  t.equal((await stat(join(dir, 'volumes', file ?? ''))).size, 8 * MiB, 'the file is cut back')
})
