/**
 * Proves the NBD server survives what real clients never send: garbage handshakes, malformed and
 * oversized options, unknown commands and flags, out-of-range and overflowing offsets, lying
 * payload lengths, bad magic, abrupt disconnects, deep pipelines and DISC with requests in
 * flight. Each case checks the exact reply (errno, option reply type) or that the connection was
 * closed, and then that the server is still alive and that a well-behaved connection opened
 * BEFORE the hostile one still writes and reads back correctly. The cases run against an
 * in-process NbdServer over a memory device and against a real `duplex node` process.
 */
import crypto from 'node:crypto'
import fs from 'node:fs/promises'
import t from 'tap'
import type { Test } from 'tap'
import { silentLogger } from '../../src/core/log.js'
import { NbdServer } from '../../src/nbd/server.js'
import { Cmd, CmdFlag, Errno, Info, Opt, Rep, ReplyType } from '../../src/nbd/protocol.js'
import { MemoryDevice, MemoryRegistry } from '../lib/memory-device.js'
import { NbdClient, infoRequest, metaContextRequest } from '../lib/nbd-client.js'
import { startNode } from '../lib/node-process.js'

const MiB = 1024 * 1024
const SIZE = 64 * MiB
const EXPORT = 'vol'
/** Offsets at or past this are answered slowly by the in-process device, to reorder replies. */
const SLOW_ZONE = 32 * MiB

interface Target {
  port: number
  optionsMax: number
  alive(): boolean
  /** Connections the server still holds (in-process only; undefined for a real node). */
  connections(): number | undefined
}

async function inProcessTarget(t: Test): Promise<Target> {
  let seed = 1
  const device = new MemoryDevice(SIZE, {
    name: EXPORT,
    delayMs: (op, offset) => {
      if (offset < SLOW_ZONE || (op !== 'read' && op !== 'write')) return 0
      seed = (seed * 1103515245 + 12345) % 2 ** 31
      return seed % 15
    },
  })
  const server = new NbdServer({
    registry: new MemoryRegistry([device]),
    log: silentLogger,
    optionsMax: 32,
    handshakeTimeoutMs: 10_000,
    shutdownGraceMs: 2_000,
  })
  const address = await server.listen('127.0.0.1', 0)
  t.teardown(() => server.close())
  return {
    port: address.port,
    optionsMax: 32,
    alive: () => true,
    connections: () => server.connectionCount,
  }
}

async function realNodeTarget(t: Test): Promise<Target> {
  const node = await startNode({ volumes: [{ name: EXPORT, size: '64M' }] })
  t.teardown(async () => {
    await node.stop()
    await fs.rm(node.dataDir, { recursive: true, force: true })
  })
  return {
    port: node.port,
    optionsMax: 256,
    alive: () => node.child.exitCode === null && node.child.signalCode === null,
    connections: () => undefined,
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

const cookieSeq = { next: 1000n }
const cookie = (): bigint => (cookieSeq.next += 1n)

async function writeOk(c: NbdClient, offset: number, data: Buffer): Promise<number> {
  const id = cookie()
  c.sendRequest({ type: Cmd.WRITE, cookie: id, offset, length: data.length }, data)
  return (await c.readSimple(id)).errno
}

async function readBack(c: NbdClient, offset: number, length: number): Promise<Buffer | number> {
  const id = cookie()
  c.sendRequest({ type: Cmd.READ, cookie: id, offset, length })
  const reply = await c.readSimple(id, length)
  return reply.errno === 0 ? (reply.data ?? Buffer.alloc(0)) : reply.errno
}

/** Runs one hostile case with a well-behaved connection opened first, then checks both. */
async function hostile(
  t: Test,
  target: Target,
  name: string,
  run: (t: Test) => Promise<void>,
): Promise<void> {
  await t.test(name, async (t) => {
    const bystander = await NbdClient.open(target.port, EXPORT)
    t.teardown(() => {
      bystander.destroy()
    })
    const offset = 4096 * crypto.randomInt(0, 1024)
    const before = crypto.randomBytes(4096)
    t.equal(await writeOk(bystander, offset, before), 0, 'bystander writes before')
    await run(t)
    t.ok(target.alive(), 'server process still alive')
    t.ok(bystander.isOpen, 'bystander connection still open')
    const after = crypto.randomBytes(4096)
    t.same(await readBack(bystander, offset, 4096), before, 'bystander reads its earlier write')
    t.equal(await writeOk(bystander, offset, after), 0, 'bystander writes after')
    t.same(await readBack(bystander, offset, 4096), after, 'bystander reads it back')
  })
}

/** A fresh connection past the greeting and client flags, ready for options. */
async function haggling(target: Target): Promise<NbdClient> {
  const c = await NbdClient.connect(target.port)
  await c.greeting()
  c.sendClientFlags(3)
  return c
}

async function transmitting(
  t: Test,
  target: Target,
  options: { structured?: boolean; baseAllocation?: boolean } = {},
): Promise<NbdClient> {
  const c = await NbdClient.open(target.port, EXPORT, options)
  t.teardown(() => {
    c.destroy()
  })
  return c
}

/** The connection still serves: a small write and read back at a private offset. */
async function stillWorks(t: Test, c: NbdClient, what: string): Promise<void> {
  const data = crypto.randomBytes(512)
  const offset = 512 * crypto.randomInt(0, 8192)
  t.equal(await writeOk(c, offset, data), 0, `${what}: write still works`)
  t.same(await readBack(c, offset, 512), data, `${what}: read still works`)
}

async function errnoOf(
  c: NbdClient,
  request: Parameters<NbdClient['sendRequest']>[0],
  payload?: Buffer,
): Promise<number> {
  c.sendRequest(request, payload)
  return (await c.readSimple(request.cookie)).errno
}

/** Writes `total` bytes of zeros, honouring backpressure; resolves false if the socket died. */
async function stream(c: NbdClient, total: number): Promise<boolean> {
  const piece = Buffer.alloc(MiB)
  for (let sent = 0; sent < total; sent += piece.length) {
    if (!c.isOpen) return false
    const n = Math.min(piece.length, total - sent)
    if (!c.socket.write(n === piece.length ? piece : piece.subarray(0, n))) {
      const drained = await Promise.race([
        new Promise<boolean>((resolve) =>
          c.socket.once('drain', () => {
            resolve(true)
          }),
        ),
        c.closed.then(() => false),
      ])
      if (!drained) return false
    }
  }
  return true
}

async function runCases(t: Test, target: Target): Promise<void> {
  await hostile(t, target, 'garbage instead of the client flags: closed', async (t) => {
    const c = await NbdClient.connect(target.port)
    t.teardown(() => {
      c.destroy()
    })
    await c.greeting()
    c.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'))
    t.ok(await c.waitClosed(), 'server hung up')
  })

  await hostile(t, target, 'unknown client flag bits, or none at all: closed', async (t) => {
    for (const flags of [3 | 4, 0x80000001, 0]) {
      const c = await NbdClient.connect(target.port)
      t.teardown(() => {
        c.destroy()
      })
      await c.greeting()
      c.sendClientFlags(flags)
      c.sendOption(Opt.LIST)
      t.ok(await c.waitClosed(), `flags 0x${flags.toString(16)}: server hung up`)
    }
  })

  await hostile(t, target, 'option with bad magic: closed', async (t) => {
    const c = await haggling(target)
    t.teardown(() => {
      c.destroy()
    })
    c.sendOption(Opt.LIST, Buffer.alloc(0), { magic: 0x1122334455667788n })
    t.ok(await c.waitClosed(), 'server hung up')
  })

  await hostile(
    t,
    target,
    'options with payloads of the wrong length: ERR_INVALID, stream in sync',
    async (t) => {
      const c = await haggling(target)
      t.teardown(() => {
        c.destroy()
      })
      const go = infoRequest(EXPORT, [Info.NAME])
      const meta = metaContextRequest(EXPORT, ['base:allocation'])
      const bad: [number, Buffer][] = [
        [Opt.STRUCTURED_REPLY, Buffer.from('x')],
        [Opt.LIST, Buffer.from('vol')],
        [Opt.INFO, go.subarray(0, go.length - 1)],
        [Opt.GO, Buffer.concat([go, Buffer.from('zz')])],
        [Opt.GO, Buffer.from([0xff, 0xff, 0xff, 0xff])],
      ]
      for (const [option, data] of bad) {
        const replies = await c.option(option, data)
        t.same(
          replies.map((r) => [r.option, r.type]),
          [[option, Rep.ERR_INVALID]],
          `option ${option}`,
        )
      }
      t.same(
        (await c.option(Opt.STRUCTURED_REPLY)).map((r) => r.type),
        [Rep.ACK],
      )
      for (const [option, data] of [
        [Opt.SET_META_CONTEXT, meta.subarray(0, meta.length - 3)],
        [Opt.LIST_META_CONTEXT, Buffer.concat([meta, Buffer.alloc(1)])],
        [Opt.SET_META_CONTEXT, Buffer.from('0000000300', 'hex')],
      ] as const) {
        const replies = await c.option(option, data)
        t.same(
          replies.map((r) => [r.option, r.type]),
          [[option, Rep.ERR_INVALID]],
          `option ${option}`,
        )
      }
      const result = await c.go(EXPORT)
      t.equal(result.sizeBytes, SIZE, 'a valid GO still works')
      const id = cookie()
      c.sendRequest({ type: Cmd.READ, cookie: id, offset: 0, length: 512 })
      const reply = await c.readStructured(id)
      t.equal(reply.errno, 0)
      t.equal(reply.data.length, 512, 'structured read after the bad options')
    },
  )

  await hostile(
    t,
    target,
    'option data of 64 KiB + 1: ERR_TOO_BIG after draining, then GO works',
    async (t) => {
      const c = await haggling(target)
      t.teardown(() => {
        c.destroy()
      })
      c.sendOption(Opt.GO, Buffer.alloc(64 * 1024 + 1))
      const replies = await c.readOptionReplies()
      t.same(
        replies.map((r) => [r.option, r.type]),
        [[Opt.GO, Rep.ERR_TOO_BIG]],
      )
      t.equal((await c.go(EXPORT)).sizeBytes, SIZE)
      await stillWorks(t, c, 'after the oversized option')
    },
  )

  await hostile(
    t,
    target,
    'option claiming 100 MiB: drained or dropped, never a crash',
    async (t) => {
      const c = await haggling(target)
      t.teardown(() => {
        c.destroy()
      })
      c.sendOption(Opt.INFO, Buffer.alloc(0), { length: 100 * MiB })
      const sent = await stream(c, 100 * MiB)
      if (!sent) {
        t.ok(await c.waitClosed(), 'server dropped the connection')
        return
      }
      const replies = await c.readOptionReplies()
      t.same(
        replies.map((r) => [r.option, r.type]),
        [[Opt.INFO, Rep.ERR_TOO_BIG]],
      )
      t.equal((await c.go(EXPORT)).sizeBytes, SIZE, 'GO after the drained option')
    },
  )

  await hostile(
    t,
    target,
    'more than optionsMax options: closed, never more than optionsMax replies',
    async (t) => {
      const c = await haggling(target)
      t.teardown(() => {
        c.destroy()
      })
      for (let i = 0; i < target.optionsMax + 5; i++) c.sendOption(Opt.PEEK_EXPORT)
      let answered = 0
      for (;;) {
        try {
          const reply = await c.readOptionReply()
          if (reply.type !== Rep.ERR_UNSUP) break
          answered++
        } catch {
          break
        }
      }
      // Replies still queued when the server cuts the connection may be lost: at most optionsMax.
      t.ok(answered <= target.optionsMax, `at most one ERR_UNSUP per allowed option (${answered})`)
      t.ok(await c.waitClosed(), 'then the server hung up')
    },
  )

  await hostile(t, target, 'unknown options: ERR_UNSUP, then GO works', async (t) => {
    const c = await haggling(target)
    t.teardown(() => {
      c.destroy()
    })
    for (const option of [Opt.STARTTLS, Opt.EXTENDED_HEADERS, 99, 0xffffffff]) {
      const replies = await c.option(option, Buffer.from('some data'))
      t.same(
        replies.map((r) => [r.option, r.type]),
        [[option, Rep.ERR_UNSUP]],
        `option ${option}`,
      )
    }
    t.equal((await c.go(EXPORT)).sizeBytes, SIZE)
    await stillWorks(t, c, 'after unknown options')
  })

  await hostile(
    t,
    target,
    'unknown commands and flags: EINVAL, connection keeps working',
    async (t) => {
      const c = await transmitting(t, target)
      for (const type of [8, 0x1234, 0xffff]) {
        t.equal(
          await errnoOf(c, { type, cookie: cookie(), offset: 0, length: 512 }),
          Errno.EINVAL,
          `type ${type}`,
        )
      }
      for (const [type, flags] of [
        [Cmd.READ, CmdFlag.DF], // DF without structured replies
        [Cmd.READ, 0x8000],
        [Cmd.FLUSH, CmdFlag.NO_HOLE],
        [Cmd.TRIM, CmdFlag.REQ_ONE],
        [Cmd.BLOCK_STATUS, 0], // no meta context negotiated
      ] as const) {
        const length = type === Cmd.FLUSH ? 0 : 512
        t.equal(
          await errnoOf(c, { type, flags, cookie: cookie(), offset: 0, length }),
          Errno.EINVAL,
          `type ${type} flags ${flags}`,
        )
      }
      t.equal(
        await errnoOf(
          c,
          { type: Cmd.WRITE, flags: CmdFlag.DF, cookie: cookie(), offset: 0, length: 512 },
          Buffer.alloc(512),
        ),
        Errno.EINVAL,
        'write with a bad flag, payload drained',
      )
      await stillWorks(t, c, 'after bad commands')

      const s = await transmitting(t, target, { structured: true })
      const id = cookie()
      s.sendRequest({ type: 0x4242, cookie: id, offset: 0, length: 1 })
      const reply = await s.readStructured(id)
      t.equal(reply.errno, Errno.EINVAL, 'structured: error chunk with EINVAL')
      t.equal(reply.chunks[0]?.type, ReplyType.ERROR)
    },
  )

  await hostile(t, target, 'out-of-range and overflowing offsets: EINVAL or ENOSPC', async (t) => {
    const c = await transmitting(t, target)
    const top = 2n ** 64n
    const cases: [number, bigint, number, number][] = [
      [Cmd.READ, BigInt(SIZE), 1, Errno.EINVAL],
      [Cmd.READ, BigInt(SIZE - 1), 2, Errno.EINVAL],
      [Cmd.READ, top - 1n, 1, Errno.EINVAL],
      [Cmd.READ, top - 512n, 0xffffffff - 511, Errno.EINVAL],
      [Cmd.TRIM, top - 1n, 2, Errno.EINVAL],
      [Cmd.CACHE, BigInt(SIZE), 4096, Errno.EINVAL],
      [Cmd.WRITE_ZEROES, top - 4096n, 8192, Errno.ENOSPC],
      [Cmd.WRITE_ZEROES, BigInt(SIZE - 4096), 8192, Errno.ENOSPC],
    ]
    for (const [type, offset, length, errno] of cases) {
      t.equal(
        await errnoOf(c, { type, cookie: cookie(), offset, length }),
        errno,
        `type ${type} at ${offset}+${length}`,
      )
    }
    const s = await transmitting(t, target, { baseAllocation: true })
    for (const [offset, length] of [
      [BigInt(SIZE), 1],
      [top - 1n, 4096],
    ] as const) {
      const id = cookie()
      s.sendRequest({ type: Cmd.BLOCK_STATUS, cookie: id, offset, length })
      const reply = await s.readStructured(id)
      t.equal(reply.errno, Errno.EINVAL, `block status at ${offset}: EINVAL error chunk`)
    }
    const id = cookie()
    s.sendRequest({ type: Cmd.BLOCK_STATUS, cookie: id, offset: SIZE - 4096, length: 4096 })
    const status = await s.readStructured(id)
    t.equal(status.chunks[0]?.type, ReplyType.BLOCK_STATUS, 'block status inside still answers')
    t.equal(
      await errnoOf(c, { type: Cmd.READ, cookie: cookie(), offset: 0, length: 0 }),
      Errno.EINVAL,
      'zero length',
    )
    await stillWorks(t, c, 'after out-of-range requests')
  })

  await hostile(
    t,
    target,
    'write past the end with its payload: drained, ENOSPC, next works',
    async (t) => {
      const c = await transmitting(t, target)
      // The payload is a valid-looking request header: if it were not drained it would be parsed.
      const trap = Buffer.alloc(4096)
      trap.writeUInt32BE(0x25609513, 0)
      for (const offset of [BigInt(SIZE - 1024), 2n ** 64n - 1024n]) {
        t.equal(
          await errnoOf(c, { type: Cmd.WRITE, cookie: cookie(), offset, length: 4096 }, trap),
          Errno.ENOSPC,
        )
      }
      await stillWorks(t, c, 'after writes past the end')
    },
  )

  await hostile(
    t,
    target,
    'write claiming a 40 MiB payload: EINVAL once drained, next works',
    async (t) => {
      const c = await transmitting(t, target)
      const id = cookie()
      c.sendRequest({ type: Cmd.WRITE, cookie: id, offset: 0, length: 40 * MiB })
      t.ok(await stream(c, 40 * MiB), 'server took the whole payload')
      t.equal((await c.readSimple(id)).errno, Errno.EINVAL)
      await stillWorks(t, c, 'after the 40 MiB write')
    },
  )

  await hostile(t, target, 'write claiming 4 GiB - 1: EINVAL, then closed', async (t) => {
    const c = await transmitting(t, target)
    const id = cookie()
    c.sendRequest(
      { type: Cmd.WRITE, cookie: id, offset: 0, length: 0xffffffff },
      Buffer.alloc(4096),
    )
    t.equal((await c.readSimple(id)).errno, Errno.EINVAL)
    t.ok(await c.waitClosed(), 'server hung up')
  })

  await hostile(
    t,
    target,
    'write claiming 4 GiB - 1 from a half-open client: closed, not buffered',
    async (t) => {
      const c = await transmitting(t, target)
      c.socket.allowHalfOpen = true // a hostile client keeps sending after the server's FIN
      const fin = new Promise<boolean>((resolve) =>
        c.socket.once('end', () => {
          resolve(true)
        }),
      )
      const id = cookie()
      c.sendRequest({ type: Cmd.WRITE, cookie: id, offset: 0, length: 0xffffffff })
      t.equal((await c.readSimple(id)).errno, Errno.EINVAL)
      t.ok(await Promise.race([fin, sleep(5000).then(() => false)]), 'server sent FIN')
      // Keep writing: a server that reads on (and buffers) never cuts us off.
      const deadline = Date.now() + 6000
      let cut = false
      while (!cut && Date.now() < deadline) {
        cut = !(await stream(c, 4 * MiB))
        await sleep(20)
      }
      t.ok(cut, 'server cut the half-open connection instead of reading on')
    },
  )

  await hostile(t, target, 'bad request magic: closed', async (t) => {
    const c = await transmitting(t, target)
    c.sendRequest({ magic: 0x25609514, type: Cmd.READ, cookie: cookie(), offset: 0, length: 512 })
    t.ok(await c.waitClosed(), 'server hung up')
    t.equal(c.bufferedBytes, 0, 'without a reply')
  })

  await hostile(t, target, 'disconnect in the middle of a header', async (t) => {
    const c = await transmitting(t, target)
    c.write(Buffer.from('2560951300000000', 'hex'))
    await sleep(20)
    c.destroy()
    await c.closed
    // What matters is asserted by hostile(): the server lives and the bystander still works.
  })

  await hostile(t, target, 'disconnect in the middle of a write payload', async (t) => {
    const c = await transmitting(t, target)
    c.sendRequest({ type: Cmd.WRITE, cookie: cookie(), offset: 0, length: MiB }, Buffer.alloc(1000))
    await sleep(20)
    c.destroy()
    await c.closed
    // What matters is asserted by hostile(): the server lives and the bystander still works.
  })

  await hostile(t, target, 'disconnect with requests in flight', async (t) => {
    const c = await transmitting(t, target)
    for (let i = 0; i < 64; i++) {
      const offset = SLOW_ZONE + 4096 * i
      if (i % 2 === 0)
        c.sendRequest(
          { type: Cmd.WRITE, cookie: cookie(), offset, length: 4096 },
          Buffer.alloc(4096, i),
        )
      else c.sendRequest({ type: Cmd.READ, cookie: cookie(), offset, length: 4096 })
    }
    c.destroy()
    await c.closed
    const connections = target.connections()
    if (connections !== undefined) {
      const deadline = Date.now() + 2000
      while (target.connections() !== 1 && Date.now() < deadline) {
        await sleep(10)
      }
      t.equal(
        target.connections(),
        1,
        'the server forgot the dropped connection once its requests ended',
      )
    }
  })

  await hostile(
    t,
    target,
    'pipelined requests answered out of order, each cookie exactly once',
    async (t) => {
      const c = await transmitting(t, target)
      const count = 200
      const expected = new Map<bigint, { kind: 'read' | 'write'; offset: number; length: number }>()
      const written = new Map<number, Buffer>()
      const sent: bigint[] = []
      for (let i = 0; i < count; i++) {
        const id = 0xabcdef0000000000n + BigInt(i)
        const offset = SLOW_ZONE + 4096 * i
        const data = Buffer.alloc(4096, i)
        c.sendRequest({ type: Cmd.WRITE, cookie: id, offset, length: 4096 }, data)
        expected.set(id, { kind: 'write', offset, length: 4096 })
        written.set(offset, data)
        sent.push(id)
      }
      const seen: bigint[] = []
      for (let i = 0; i < count; i++) {
        const reply = await c.readReply()
        if (reply.kind !== 'simple' || reply.errno !== 0)
          t.fail(`bad reply ${JSON.stringify(reply.kind)}`)
        seen.push(reply.cookie)
      }
      t.same(
        [...seen].sort((a, b) => (a < b ? -1 : 1)),
        sent,
        'every cookie answered exactly once',
      )
      if (target.connections() !== undefined)
        t.notSame(seen, sent, 'replies came back out of order')
      for (let i = 0; i < count; i++) {
        c.sendRequest({
          type: Cmd.READ,
          cookie: BigInt(i),
          offset: SLOW_ZONE + 4096 * i,
          length: 4096,
        })
      }
      let mismatches = 0
      const readSeen = new Set<bigint>()
      for (let i = 0; i < count; i++) {
        const reply = await c.readReply(() => 4096)
        if (reply.kind !== 'simple' || reply.data === undefined || readSeen.has(reply.cookie)) {
          mismatches++
          continue
        }
        readSeen.add(reply.cookie)
        if (
          !reply.data.equals(
            written.get(SLOW_ZONE + 4096 * Number(reply.cookie)) ?? Buffer.alloc(0),
          )
        )
          mismatches++
      }
      t.equal(mismatches, 0, 'each read reply carries the data for its own cookie')
      t.equal(readSeen.size, count)
    },
  )

  await hostile(
    t,
    target,
    'DISC with requests in flight: they are answered, then closed',
    async (t) => {
      const c = await transmitting(t, target)
      const ids: bigint[] = []
      for (let i = 0; i < 16; i++) {
        const id = cookie()
        ids.push(id)
        c.sendRequest(
          { type: Cmd.WRITE, cookie: id, offset: SLOW_ZONE + 4096 * i, length: 4096 },
          Buffer.alloc(4096, 7),
        )
      }
      c.sendRequest({ type: Cmd.DISC, cookie: cookie(), offset: 0, length: 0 })
      const got: bigint[] = []
      for (let i = 0; i < ids.length; i++) {
        const reply = await c.readReply()
        if (reply.kind === 'simple' && reply.errno === 0) got.push(reply.cookie)
      }
      t.same(
        got.sort((a, b) => (a < b ? -1 : 1)),
        ids,
        'every request before DISC was answered',
      )
      t.ok(await c.waitClosed(), 'then the server closed the connection')
      t.equal(c.bufferedBytes, 0, 'and sent nothing for the DISC itself')
    },
  )
}

void t.test('in-process NbdServer over a memory device', async (t) => {
  const target = await inProcessTarget(t)
  await runCases(t, target)
})

void t.test('a real duplex node process', async (t) => {
  // Our own daemon, not an optional external tool: if it cannot start, that is a failure.
  const target = await realNodeTarget(t)
  await runCases(t, target)
})
