/**
 * `node dist/bench/catalog.js`: how long a catalog change takes at the witness (validated,
 * placed, written with a synced RocksDB batch, answered) and a catalog read, over gRPC on
 * loopback, as the catalog grows to `--entries` domains (default 300). Control-plane numbers:
 * they bound how fast an admin script or a node's catalog poll goes, not the data path.
 */
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { AdminClient } from '../src/witness/admin-service.js'
import { freePort, installCleanupHandlers, makeTempDir, spawnTracked, stopTracked } from './proc.js'

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(repoRoot, 'dist/src/cli/main.js')

function argument(name: string): string | undefined {
  const index = process.argv.indexOf(`--${name}`)
  return index < 0 ? undefined : process.argv[index + 1]
}

function quantile(values: readonly number[], q: number): string {
  const sorted = [...values].sort((x, y) => x - y)
  return (sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))] ?? 0).toFixed(2)
}

async function main(): Promise<void> {
  installCleanupHandlers()
  const entries = Number(argument('entries') ?? 300)
  const dir = makeTempDir('duplex-bench-catalog-')
  const address = `127.0.0.1:${await freePort()}`
  const witness = spawnTracked('witness', process.execPath, [
    ...[cli, 'witness', '--data-dir', join(dir, 'w'), '--listen', address],
  ])
  const admin = new AdminClient(address)
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        await admin.getCatalog()
        break
      } catch (error) {
        if (attempt > 100) throw error
        await new Promise((r) => setTimeout(r, 100))
      }
    }
    const changes: number[] = []
    for (let i = 0; i < entries; i++) {
      const started = performance.now()
      await admin.change({ type: 'addDomain', name: `site-${i}`, kind: 'data' })
      changes.push(performance.now() - started)
    }
    const reads: number[] = []
    for (let i = 0; i < entries; i++) {
      const started = performance.now()
      await admin.getCatalog()
      reads.push(performance.now() - started)
    }
    console.log(`| measure (${entries} entries) | p50 ms | p99 ms |`)
    console.log('|---|--:|--:|')
    console.log(`| change (durable) | ${quantile(changes, 0.5)} | ${quantile(changes, 0.99)} |`)
    console.log(`| GetCatalog | ${quantile(reads, 0.5)} | ${quantile(reads, 0.99)} |`)
  } finally {
    admin.close()
    await stopTracked(witness)
  }
}

await main()
