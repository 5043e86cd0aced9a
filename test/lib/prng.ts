/** A seeded PRNG (mulberry32) for randomized tests: print the seed, replay the run. */
export class Prng {
  private state: number

  constructor(readonly seed: number) {
    this.state = seed >>> 0
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n)
  }

  bool(probability = 0.5): boolean {
    return this.next() < probability
  }
}

/** The seed from DUPLEX_SEED, else a fresh one; tests print it. */
export function testSeed(): number {
  const fromEnv = process.env['DUPLEX_SEED']
  return fromEnv === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(fromEnv)
}
