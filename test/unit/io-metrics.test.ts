/**
 * The client I/O metrics (src/metrics/io-metrics.ts): what the NBD server reports becomes
 * counters, a latency histogram and an in-flight gauge per volume and command, and the series of
 * a volume the node no longer serves disappear at the next scrape.
 */
import t from 'tap'
import { Registry } from 'prom-client'
import { IoMetrics } from '../../src/metrics/io-metrics.js'

async function sample(registry: Registry, name: string): Promise<Map<string, number>> {
  const metric = await registry.getSingleMetric(name)?.get()
  return new Map(
    (metric?.values ?? []).map((value) => [
      Object.entries(value.labels)
        .map(([key, label]) => `${key}=${String(label)}`)
        .join(','),
      value.value,
    ]),
  )
}

t.test('requests, bytes, errors, latency and in-flight, by volume and command', async (t) => {
  const registry = new Registry()
  let live = ['vm1', 'vm2']
  const metrics = new IoMetrics(registry, () => live)
  metrics.started('vm1')
  metrics.started('vm1')
  metrics.started('vm2')
  t.same(
    await sample(registry, 'duplex_volume_requests_in_flight'),
    new Map([
      ['volume=vm1', 2],
      ['volume=vm2', 1],
    ]),
  )
  metrics.finished('vm1', 'write', 4096, 0.0004, false)
  metrics.finished('vm1', 'read', 65536, 0.003, true)
  metrics.finished('vm2', 'flush', 0, 0.02, false)
  t.same(
    await sample(registry, 'duplex_volume_requests_total'),
    new Map([
      ['volume=vm1,op=write', 1],
      ['volume=vm1,op=read', 1],
      ['volume=vm2,op=flush', 1],
    ]),
  )
  t.same(
    await sample(registry, 'duplex_volume_data_bytes_total'),
    new Map([
      ['volume=vm1,op=write', 4096],
      ['volume=vm1,op=read', 65536],
      ['volume=vm2,op=flush', 0],
    ]),
    'a flush moves no data bytes',
  )
  t.same(
    await sample(registry, 'duplex_volume_request_errors_total'),
    new Map([
      ['volume=vm1,op=write', 0],
      ['volume=vm1,op=read', 1],
      ['volume=vm2,op=flush', 0],
    ]),
  )
  const buckets = await sample(registry, 'duplex_volume_request_duration_seconds')
  t.equal(buckets.get('volume=vm1,op=write,le=0.0005'), 1, '0.4 ms lands in the 0.5 ms bucket')
  t.equal(buckets.get('volume=vm1,op=write,le=0.00025'), 0)
  t.equal(buckets.get('volume=vm2,op=flush,le=0.025'), 1)
  t.equal(buckets.get('volume=vm2,op=flush,le=0.01'), 0, 'cumulative: 20 ms is above 10 ms')
  t.equal(buckets.get('volume=vm1,op=read,le=+Inf'), 1)
  const text = await registry.metrics()
  t.match(text, /duplex_volume_request_duration_seconds_sum\{volume="vm1",op="write"\} 0\.0004/)
  t.match(text, /duplex_volume_request_duration_seconds_count\{volume="vm2",op="flush"\} 1/)
  t.match(text, /# TYPE duplex_volume_requests_total counter/)
  t.same(
    await sample(registry, 'duplex_volume_requests_in_flight'),
    new Map([
      ['volume=vm1', 0],
      ['volume=vm2', 0],
    ]),
  )

  // vm2 is deleted from the node: its series go at the next scrape.
  live = ['vm1']
  t.same([...(await sample(registry, 'duplex_volume_requests_in_flight')).keys()], ['volume=vm1'])
  t.same(
    [...(await sample(registry, 'duplex_volume_requests_total')).keys()],
    ['volume=vm1,op=write', 'volume=vm1,op=read'],
  )
  metrics.finished('vm1', 'write', 4096, 0.0004, false)
  t.equal(
    (await sample(registry, 'duplex_volume_requests_total')).get('volume=vm1,op=write'),
    2,
    'the cached series keep counting',
  )
})
