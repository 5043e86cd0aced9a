/**
 * Metrics against a real Prometheus (Debian's `prometheus` package): the shipped rules pass
 * `promtool check rules` and their unit tests (`promtool test rules`); every /metrics output of a
 * running cluster passes `promtool check metrics`; a Prometheus server scraping a cluster (a
 * witness and two nodes in two sites) finds the expected series with plausible values after a short
 * workload, and sees the volume degraded after a node is killed.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import fs from 'node:fs/promises'
import path from 'node:path'
import {
  adminCli,
  freePorts,
  missingTools,
  repoRoot,
  run,
  spawnDaemon,
  startWitness,
  tempDir,
  until,
} from '../lib/node-process.js'
import type { DaemonProcess } from '../lib/node-process.js'

const skip = await missingTools(['promtool', 'prometheus', 'qemu-io'])
const rules = path.join(repoRoot, 'deploy/prometheus')

t.test(
  'the shipped alert rules are valid and their unit tests pass',
  { skip: skip ?? false },
  async (t) => {
    const check = await run('promtool', ['check', 'rules', path.join(rules, 'alerts.yml')])
    t.equal(check.code, 0, `promtool check rules: ${check.stdout}${check.stderr}`)
    const unit = await run('promtool', ['test', 'rules', path.join(rules, 'alerts.test.yml')])
    t.equal(unit.code, 0, `promtool test rules: ${unit.stdout}${unit.stderr}`)
    const config = await run('promtool', ['check', 'config', path.join(rules, 'prometheus.yml')])
    t.equal(config.code, 0, `promtool check config: ${config.stdout}${config.stderr}`)
  },
)

interface QueryResult {
  metric: Record<string, string>
  value: [number, string]
}

t.test(
  'Prometheus scrapes a cluster: series, values, and a degraded volume after a kill',
  { skip: skip ?? false, timeout: 180_000 },
  async (t) => {
    const dir = await tempDir('duplex-prometheus-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    // A witness and two nodes in two sites, built with the CLI, each with its metrics port.
    const witness = await startWitness()
    t.teardown(() => witness.stop())
    const { json, ok } = adminCli(witness.address)
    const port = await freePorts(3)
    await ok(t, 'domain', 'add', 'site-a')
    await ok(t, 'domain', 'add', 'site-b')
    await ok(t, 'domain', 'add', 'site-w', '--kind', 'witness')
    const nodes = new Map<string, DaemonProcess>()
    t.teardown(() => Promise.all([...nodes.values()].map((node) => node.stop())))
    for (const [index, name] of ['node-a', 'node-b'].entries()) {
      const domain = index === 0 ? 'site-a' : 'site-b'
      await ok(t, 'node', 'add', name, '--domain', domain, '--address', `127.0.0.1:${port + index}`)
      const data = path.join(dir, name)
      const args = ['node', '--name', name, '--data-dir', data, '--listen', '127.0.0.1:0']
      args.push('--metrics-listen', '127.0.0.1:0', '--witness', witness.address)
      nodes.set(name, await spawnDaemon(name, args))
    }
    await until('both nodes up', async () => {
      const rows = await json<{ up: boolean; nbd: string }[]>('node', 'list')
      return rows.every((row) => row.up && row.nbd !== '') ? true : undefined
    })
    await ok(
      t,
      'volume',
      'create',
      'vol',
      '--size',
      '64M',
      '--preferred-domain',
      'site-a',
      '--wait',
    )
    const nbdA = /nbd:\/\/(\S+)/.exec(nodes.get('node-a')?.ready ?? '')?.[1] ?? ''
    const targets = {
      'node-a': `127.0.0.1:${nodes.get('node-a')?.metricsPort ?? 0}`,
      'node-b': `127.0.0.1:${nodes.get('node-b')?.metricsPort ?? 0}`,
      witness: `127.0.0.1:${witness.metricsPort ?? 0}`,
    }
    let exposed = ''
    for (const [name, target] of Object.entries(targets)) {
      const body = await (await fetch(`http://${target}/metrics`)).text()
      exposed += body
      const checked = await promtoolCheckMetrics(body)
      t.equal(checked.code, 0, `promtool check metrics on ${name}: ${checked.output}`)
    }
    // Every duplex series the alert rules and the dashboard use is one the processes expose.
    const dashboard = await fs.readFile(path.join(repoRoot, 'deploy/grafana/duplex.json'), 'utf8')
    const alerts = await fs.readFile(path.join(rules, 'alerts.yml'), 'utf8')
    const used = new Set(
      [...`${dashboard}\n${alerts}`.matchAll(/\bduplex_[a-z_]+/g)]
        .map(([name]) => name.replace(/_(bucket|count|sum)$/, ''))
        .filter((name) => !name.startsWith('duplex:')),
    )
    const missing = [...used].filter((name) => !exposed.includes(`# TYPE ${name} `))
    t.same(missing, [], `the rules and the dashboard use ${used.size} exposed series`)

    const promPort = await freePorts(1)
    const config = path.join(dir, 'prometheus.yml')
    await fs.writeFile(
      config,
      [
        'global: { scrape_interval: 1s, evaluation_interval: 1s }',
        `rule_files: ['${path.join(rules, 'alerts.yml')}']`,
        'scrape_configs:',
        '  - job_name: duplex-node',
        `    static_configs: [{ targets: ['${targets['node-a']}', '${targets['node-b']}'] }]`,
        '  - job_name: duplex-witness',
        `    static_configs: [{ targets: ['${targets.witness}'] }]`,
        '',
      ].join('\n'),
    )
    const prometheus = spawn(
      'prometheus',
      [
        `--config.file=${config}`,
        `--storage.tsdb.path=${path.join(dir, 'tsdb')}`,
        `--web.listen-address=127.0.0.1:${promPort}`,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    )
    let promLog = ''
    prometheus.stderr.on('data', (chunk: Buffer) => (promLog += chunk.toString()))
    const promExited = new Promise((resolve) => prometheus.once('exit', resolve))
    t.teardown(async () => {
      prometheus.kill('SIGTERM')
      await promExited
    })
    const query = async (expr: string): Promise<QueryResult[]> => {
      const url = `http://127.0.0.1:${promPort}/api/v1/query?query=${encodeURIComponent(expr)}`
      const answer = (await (await fetch(url)).json()) as {
        status: string
        data: { result: QueryResult[] }
      }
      if (answer.status !== 'success') throw new Error(`${expr}: ${JSON.stringify(answer)}`)
      return answer.data.result
    }
    const value = (result: QueryResult[]): number => Number(result[0]?.value[1] ?? Number.NaN)
    try {
      await until('three targets up', async () =>
        value(await query('sum(up)')) === 3 ? true : undefined,
      )
    } catch (error) {
      t.comment(promLog.slice(-2000))
      throw error
    }

    // A short workload through node-a.
    const write = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'write -P 0x11 0 8M', '-c', 'read -P 0x11 0 8M', '-c', 'flush'],
      `nbd://${nbdA}/vol`,
    ])
    t.equal(write.code, 0, write.stderr)
    const writes = await until('write requests counted', async () => {
      const result = await query(
        'sum(duplex_volume_requests_total{job="duplex-node",volume="vol",op="write"})',
      )
      return value(result) > 0 ? value(result) : undefined
    })
    t.ok(writes >= 1, `writes counted: ${writes}`)
    const bytes = value(await query('sum(duplex_volume_data_bytes_total{volume="vol",op="write"})'))
    t.equal(bytes, 8 * 1024 * 1024, 'the bytes written, exactly')
    t.equal(
      value(await query('sum(duplex_volume_data_bytes_total{volume="vol",op="read"})')),
      8 * 1024 * 1024,
      'and read',
    )
    const p99 = value(
      await query(
        'histogram_quantile(0.99, sum by (le) (duplex_volume_request_duration_seconds_bucket{volume="vol",op="write"}))',
      ),
    )
    t.ok(p99 > 0 && p99 < 5, `write latency p99 is plausible: ${p99} s`)
    t.equal(
      value(await query('sum(duplex_replica_role{volume="vol",role="primary"})')),
      1,
      'exactly one primary',
    )
    t.equal(
      value(await query('sum(duplex_replica_state{volume="vol",state="UpToDate"})')),
      2,
      'both replicas UpToDate',
    )
    t.equal(value(await query('sum(duplex_witness_reachable)')), 2, 'both nodes reach the witness')
    t.equal(value(await query('duplex_witness_volumes{state="in_sync"}')), 1)
    t.ok(
      value(await query('sum(duplex_replication_peer_round_trip_seconds_count{volume="vol"})')) > 0,
      'peer round trips measured',
    )
    t.ok(value(await query('min(duplex_witness_lease_remaining_seconds)')) > 0, 'leases held')
    t.ok(value(await query('sum(process_resident_memory_bytes)')) > 0, 'process metrics')

    // Every query of the dashboard is valid PromQL, and the health ones find data.
    const panels = (
      JSON.parse(await fs.readFile(path.join(repoRoot, 'deploy/grafana/duplex.json'), 'utf8')) as {
        panels: { title: string; targets?: { expr: string }[] }[]
      }
    ).panels
    const exprs = (title: string): string[] =>
      (panels.find((panel) => panel.title === title)?.targets ?? []).map((target) =>
        target.expr.replaceAll('$volume', '.*').replaceAll('$__rate_interval', '1m'),
      )
    let queries = 0
    for (const panel of panels) {
      for (const expr of exprs(panel.title)) {
        queries += 1
        await query(expr).catch((error: unknown) => {
          t.fail(`${panel.title}: ${String(error)}`)
        })
      }
    }
    t.comment(`${queries} dashboard queries, all valid PromQL`)
    // A rate needs two scrapes after the workload: wait for them.
    for (const title of [
      'Replica state',
      'IOPS by volume',
      'Throughput by volume',
      'Write latency p50 / p99',
      'Peer round trip p99',
      'Node leases at the witness',
    ]) {
      const [expr = ''] = exprs(title)
      t.ok(
        await until(`data for "${title}"`, async () =>
          (await query(expr)).length > 0 ? true : undefined,
        ),
        `the dashboard's "${title}" shows data`,
      )
    }

    // Kill the node that is not the primary: the primary runs alone, and Prometheus sees it.
    const [primary] = await query('duplex_replica_role{volume="vol",role="primary"} == 1')
    t.equal(primary?.metric['node'], 'node-a', 'the primary runs in the preferred site')
    await nodes.get('node-b')?.kill()
    const degraded = await until(
      'the volume seen degraded',
      async () => {
        const result = await query('max(duplex_replica_degraded{volume="vol"})')
        return value(result) === 1 ? true : undefined
      },
      60_000,
    )
    t.ok(degraded, 'duplex_replica_degraded is 1 for the volume')
    t.ok(
      await until('the witness counting it degraded', async () =>
        value(await query('duplex_witness_volumes{state="degraded"}')) === 1 ? true : undefined,
      ),
      'and the witness counts it degraded',
    )
  },
)

/** `promtool check metrics` reads the exposition on stdin. */
function promtoolCheckMetrics(body: string): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn('promtool', ['check', 'metrics'], { stdio: ['pipe', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()))
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()))
    child.once('exit', (code) => {
      resolve({ code, output })
    })
    child.stdin.end(body)
  })
}
