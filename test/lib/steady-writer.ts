/**
 * Test helper: a steady writer with verification, through NBD (the in-process client). It
 * writes 4 KiB blocks round-robin over a region, each with FUA and a pattern naming the block and
 * its generation, one at a time, and records what was acknowledged and when. `verify` reads the
 * region back through any node and checks that every block holds its last acknowledged
 * generation, or a later one that was sent but not acknowledged (never anything older).
 */
import { Cmd, CmdFlag } from '../../src/nbd/protocol.js'
import { NbdClient } from './nbd-client.js'

const blockBytes = 4096

export function blockPattern(block: number, generation: number): Buffer {
  const data = Buffer.alloc(blockBytes)
  for (let i = 0; i < blockBytes; i += 8) {
    data.writeUInt32LE(block, i)
    data.writeUInt32LE(generation, i + 4)
  }
  return data
}

export interface WriterReport {
  acknowledged: number
  errors: number
  /** The longest time between two acknowledged writes, in ms. */
  longestStallMs: number
  /** When the longest stall ended (performance time, ms). */
  stallEndedAt: number
  lastError: string | undefined
}

export class SteadyWriter {
  /** block -> last acknowledged generation */
  readonly acked = new Map<number, number>()
  /** block -> last generation sent */
  readonly sent = new Map<number, number>()
  private stopping = false
  private readonly done: Promise<void>
  private readonly report: WriterReport = {
    acknowledged: 0,
    errors: 0,
    longestStallMs: 0,
    stallEndedAt: 0,
    lastError: undefined,
  }
  private lastAckAt = performance.now()
  private errorWaiters: (() => void)[] = []

  private constructor(
    private readonly client: NbdClient,
    private readonly offset: number,
    private readonly blocks: number,
  ) {
    this.done = this.loop()
  }

  static async start(
    port: number,
    volume: string,
    offset = 0,
    blocks = 256,
  ): Promise<SteadyWriter> {
    return new SteadyWriter(await NbdClient.open(port, volume), offset, blocks)
  }

  get stats(): WriterReport {
    return { ...this.report }
  }

  /** Resolves at the next failed write. */
  nextError(): Promise<void> {
    return new Promise((resolve) => this.errorWaiters.push(resolve))
  }

  /** Resolves once `count` more writes were acknowledged (or rejects after `timeoutMs`). */
  async progress(count: number, timeoutMs = 30_000): Promise<void> {
    const target = this.report.acknowledged + count
    const deadline = performance.now() + timeoutMs
    while (this.report.acknowledged < target) {
      if (performance.now() > deadline) {
        throw new Error(`writer made no progress: ${JSON.stringify(this.report)}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  }

  async stop(): Promise<WriterReport> {
    this.stopping = true
    await this.done
    this.client.socket.destroy()
    return this.stats
  }

  /** Reads the region through `port` and checks every block; returns the problems found. */
  async verify(port: number, volume: string): Promise<string[]> {
    const reader = await NbdClient.open(port, volume)
    const problems: string[] = []
    try {
      for (let block = 0; block < this.blocks; block++) {
        const acked = this.acked.get(block)
        if (acked === undefined) continue
        const cookie = BigInt(block + 1)
        reader.sendRequest({
          type: Cmd.READ,
          cookie,
          offset: this.offset + block * blockBytes,
          length: blockBytes,
        })
        const reply = await reader.readSimple(cookie, blockBytes, 30_000)
        if (reply.errno !== 0 || reply.data === undefined) {
          problems.push(`block ${block}: read failed with errno ${reply.errno}`)
          continue
        }
        const holdsBlock = reply.data.readUInt32LE(0)
        const generation = reply.data.readUInt32LE(4)
        const sent = this.sent.get(block) ?? acked
        if (
          holdsBlock !== block ||
          generation < acked ||
          generation > sent ||
          !reply.data.equals(blockPattern(block, generation))
        ) {
          problems.push(
            `block ${block}: holds block ${holdsBlock} generation ${generation}, acknowledged ${acked} (sent up to ${sent})`,
          )
        }
      }
    } finally {
      reader.socket.destroy()
    }
    return problems
  }

  private async loop(): Promise<void> {
    let index = 0
    while (!this.stopping && this.client.isOpen) {
      const block = index % this.blocks
      const generation = Math.floor(index / this.blocks) + 1
      const cookie = BigInt(index + 1)
      this.sent.set(block, generation)
      this.client.sendRequest(
        {
          type: Cmd.WRITE,
          flags: CmdFlag.FUA,
          cookie,
          offset: this.offset + block * blockBytes,
          length: blockBytes,
        },
        blockPattern(block, generation),
      )
      let errno: number
      try {
        errno = (await this.client.readSimple(cookie, 0, 120_000)).errno
      } catch (error) {
        this.report.lastError = String(error)
        this.report.errors += 1
        for (const wake of this.errorWaiters.splice(0)) wake()
        return
      }
      const now = performance.now()
      if (errno === 0) {
        this.acked.set(block, generation)
        this.report.acknowledged += 1
        const stall = now - this.lastAckAt
        if (stall > this.report.longestStallMs) {
          this.report.longestStallMs = stall
          this.report.stallEndedAt = now
        }
        this.lastAckAt = now
        index += 1
      } else {
        this.report.errors += 1
        this.report.lastError = `errno ${errno}`
        for (const wake of this.errorWaiters.splice(0)) wake()
        await new Promise((resolve) => setTimeout(resolve, 100))
        // Retry the same block with the next generation: the failed one may or may not be there.
        index += this.blocks
      }
    }
  }
}
