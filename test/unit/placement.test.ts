import t, { type Test } from 'tap'
import {
  place,
  usedBytes,
  type ClusterView,
  type NodeView,
  type Plan,
  type PlacementRequest,
  type PlacementResult,
  type VolumeView,
} from '../../src/placement/placement.js'
import { GiB } from '../../src/core/units.js'
import { Prng, testSeed } from '../lib/prng.js'

/** Two sites with two nodes each and a witness site; `extra` adds to or replaces parts. */
function cluster(extra: Partial<ClusterView> = {}): ClusterView {
  return {
    domains: [
      { name: 'site-a', kind: 'data' },
      { name: 'site-b', kind: 'data' },
      { name: 'site-w', kind: 'witness' },
    ],
    nodes: [
      node('a1', 'site-a', 100),
      node('a2', 'site-a', 100),
      node('b1', 'site-b', 100),
      node('b2', 'site-b', 100),
    ],
    volumes: [],
    ...extra,
  }
}

function node(
  name: string,
  domain: string,
  capacityGiB: number,
  state: NodeView['state'] = 'active',
): NodeView {
  return { name, domain, capacityBytes: capacityGiB * GiB, state }
}

function volume(name: string, sizeGiB: number, replicas: [string, string]): VolumeView {
  return { name, sizeBytes: sizeGiB * GiB, replicas }
}

function planOf(t: Test, result: PlacementResult): Plan {
  if (!result.ok) {
    t.fail(`expected a plan, got: ${result.reason}`)
    throw new Error(result.reason)
  }
  return result.plan
}

function reasonOf(t: Test, result: PlacementResult): string {
  if (result.ok) {
    t.fail(`expected a refusal, got ${JSON.stringify(result.plan)}`)
    return ''
  }
  return result.reason
}

t.test('create: two replicas in two data domains, the witness in the third', async (t) => {
  const plan = planOf(t, place(cluster(), { type: 'create', volume: 'v', sizeBytes: 10 * GiB }))
  t.same(plan, { type: 'create', volume: 'v', replicas: ['a1', 'b1'], witnessDomain: 'site-w' })
})

t.test(
  'create: the preferred domain holds the first replica (where the primary starts)',
  async (t) => {
    const plan = planOf(
      t,
      place(cluster(), { type: 'create', volume: 'v', sizeBytes: GiB, preferredDomain: 'site-b' }),
    )
    t.same(plan.type === 'create' && plan.replicas, ['b1', 'a1'])
  },
)

t.test('create: balanced, the node with the most free bytes in each domain', async (t) => {
  const view = cluster({ volumes: [volume('old', 30, ['a1', 'b2'])] })
  const plan = planOf(t, place(view, { type: 'create', volume: 'v', sizeBytes: GiB }))
  t.same(plan.type === 'create' && plan.replicas, ['a2', 'b1'])
})

t.test('create: draining and down nodes receive nothing', async (t) => {
  const view = cluster({
    nodes: [
      node('a1', 'site-a', 100, 'draining'),
      node('a2', 'site-a', 10),
      node('b1', 'site-b', 100, 'down'),
      node('b2', 'site-b', 10),
    ],
  })
  const plan = planOf(t, place(view, { type: 'create', volume: 'v', sizeBytes: GiB }))
  t.same(plan.type === 'create' && plan.replicas, ['a2', 'b2'])
})

t.test('create: never both replicas in one site, whatever the space elsewhere', async (t) => {
  const view = cluster({
    nodes: [node('a1', 'site-a', 100), node('a2', 'site-a', 100), node('b1', 'site-b', 10)],
  })
  const reason = reasonOf(t, place(view, { type: 'create', volume: 'v', sizeBytes: 50 * GiB }))
  t.match(reason, /only one data domain has an active node with 50\.0 GiB free \(site-a\)/)
  t.match(reason, /the most free in site-b is 10\.0 GiB on b1/)
})

t.test('create: a volume larger than any node says how much the largest has', async (t) => {
  const reason = reasonOf(
    t,
    place(cluster(), { type: 'create', volume: 'v', sizeBytes: 500 * GiB }),
  )
  t.match(reason, /no data domain has an active node with 500\.0 GiB free/)
  t.match(reason, /the most free in site-a is 100\.0 GiB on a1/)
})

t.test('create: refusals that name what to do', async (t) => {
  const noWitness = cluster({
    domains: [
      { name: 'site-a', kind: 'data' },
      { name: 'site-b', kind: 'data' },
    ],
  })
  t.match(
    reasonOf(t, place(noWitness, { type: 'create', volume: 'v', sizeBytes: GiB })),
    /no witness domain.*duplex domain add NAME --kind witness/,
  )
  const oneSite = cluster({
    domains: [
      { name: 'site-a', kind: 'data' },
      { name: 'site-w', kind: 'witness' },
    ],
  })
  t.match(
    reasonOf(t, place(oneSite, { type: 'create', volume: 'v', sizeBytes: GiB })),
    /two data domains.*has 1 \(site-a\)/,
  )
  t.match(
    reasonOf(
      t,
      place(cluster(), { type: 'create', volume: 'v', sizeBytes: GiB, preferredDomain: 'site-x' }),
    ),
    /there is no domain site-x; data domains: site-a, site-b/,
  )
  t.match(
    reasonOf(
      t,
      place(cluster(), { type: 'create', volume: 'v', sizeBytes: GiB, preferredDomain: 'site-w' }),
    ),
    /site-w is a witness domain/,
  )
  const taken = cluster({ volumes: [volume('v', 1, ['a1', 'b1'])] })
  t.match(
    reasonOf(t, place(taken, { type: 'create', volume: 'v', sizeBytes: GiB })),
    /a volume named v exists already/,
  )
  for (const size of [0, -1, 1.5, Number.NaN]) {
    t.match(
      reasonOf(t, place(cluster(), { type: 'create', volume: 'v', sizeBytes: size })),
      /positive number of bytes/,
    )
  }
  const fullPreferred = cluster({
    nodes: [node('a1', 'site-a', 1), node('b1', 'site-b', 100), node('c1', 'site-c', 100)],
    domains: [...cluster().domains, { name: 'site-c', kind: 'data' }],
  })
  t.match(
    reasonOf(
      t,
      place(fullPreferred, {
        type: 'create',
        volume: 'v',
        sizeBytes: 10 * GiB,
        preferredDomain: 'site-a',
      }),
    ),
    /no node of site-a has 10\.0 GiB free; the most free in site-a is 1\.0 GiB on a1/,
  )
})

t.test("move: within the replica's domain, to the most free node by default", async (t) => {
  const view = cluster({
    nodes: [...cluster().nodes, node('a3', 'site-a', 200)],
    volumes: [volume('v', 10, ['a1', 'b1'])],
  })
  t.same(planOf(t, place(view, { type: 'move', volume: 'v', fromNode: 'a1' })), {
    type: 'moves',
    moves: [{ volume: 'v', fromNode: 'a1', toNode: 'a3' }],
  })
  t.same(planOf(t, place(view, { type: 'move', volume: 'v', fromNode: 'a1', toNode: 'a2' })), {
    type: 'moves',
    moves: [{ volume: 'v', fromNode: 'a1', toNode: 'a2' }],
  })
})

t.test('move: refusals', async (t) => {
  const view = cluster({
    nodes: [...cluster().nodes, node('a3', 'site-a', 5), node('a4', 'site-a', 100, 'draining')],
    volumes: [volume('v', 10, ['a1', 'b1'])],
  })
  const move = (request: Partial<Extract<PlacementRequest, { type: 'move' }>>): string =>
    reasonOf(t, place(view, { type: 'move', volume: 'v', fromNode: 'a1', ...request }))
  t.match(move({ toNode: 'b2' }), /b2 is in site-b; a replica moves within its domain \(site-a\)/)
  t.match(move({ toNode: 'a3' }), /a3 has 5\.0 GiB free, v needs 10\.0 GiB/)
  t.match(move({ toNode: 'a4' }), /a4 is draining and receives no replicas/)
  t.match(move({ toNode: 'zz' }), /there is no node zz/)
  t.match(move({ fromNode: 'a2' }), /v has no replica on a2; its replicas are on a1 and b1/)
  t.match(move({ volume: 'w' }), /there is no volume w/)
  const single = cluster({
    nodes: [node('a1', 'site-a', 100), node('b1', 'site-b', 100)],
    volumes: [volume('v', 10, ['a1', 'b1'])],
  })
  t.match(
    reasonOf(t, place(single, { type: 'move', volume: 'v', fromNode: 'a1' })),
    /v \(10\.0 GiB\) fits on no other active node of site-a; site-a has no other active node\. Add a node to site-a/,
  )
})

t.test(
  'drain: every replica on the node moves within its domain, counting space as it goes',
  async (t) => {
    const view = cluster({
      nodes: [
        node('a1', 'site-a', 100),
        node('a2', 'site-a', 60),
        node('a3', 'site-a', 50),
        node('b1', 'site-b', 100),
      ],
      volumes: [
        volume('big', 40, ['a1', 'b1']),
        volume('mid', 30, ['a1', 'b1']),
        volume('other', 5, ['a2', 'b1']),
      ],
    })
    t.same(planOf(t, place(view, { type: 'drain', node: 'a1' })), {
      type: 'moves',
      moves: [
        { volume: 'big', fromNode: 'a1', toNode: 'a2' },
        { volume: 'mid', fromNode: 'a1', toNode: 'a3' },
      ],
    })
    t.same(
      planOf(t, place(view, { type: 'drain', node: 'a3' })),
      { type: 'moves', moves: [] },
      'an empty node drains at once',
    )
  },
)

t.test('drain: finds a fitting plan where the greedy choice would get stuck', async (t) => {
  // Greedy puts 6 on a2 (most free, 10), leaving 4 and 4 for 5 and 5: stuck. 5+5 on a2, 6 on a3 fits.
  const view = cluster({
    nodes: [
      node('a1', 'site-a', 100),
      node('a2', 'site-a', 10),
      node('a3', 'site-a', 8),
      node('b1', 'site-b', 100),
    ],
    volumes: [
      volume('x', 6, ['a1', 'b1']),
      volume('y', 5, ['a1', 'b1']),
      volume('z', 5, ['a1', 'b1']),
    ],
  })
  const plan = planOf(t, place(view, { type: 'drain', node: 'a1' }))
  t.same(plan, {
    type: 'moves',
    moves: [
      { volume: 'x', fromNode: 'a1', toNode: 'a3' },
      { volume: 'y', fromNode: 'a1', toNode: 'a2' },
      { volume: 'z', fromNode: 'a1', toNode: 'a2' },
    ],
  })
})

t.test('drain: refuses with the volume that does not fit and where space is', async (t) => {
  const view = cluster({
    nodes: [node('a1', 'site-a', 100), node('a2', 'site-a', 20), node('b1', 'site-b', 100)],
    volumes: [volume('x', 15, ['a1', 'b1']), volume('y', 10, ['a1', 'b1'])],
  })
  const reason = reasonOf(t, place(view, { type: 'drain', node: 'a1' }))
  t.match(
    reason,
    /cannot drain a1: y \(10\.0 GiB\) fits on no other active node of site-a; the most free in site-a is 5\.0 GiB on a2/,
  )
  t.match(reason, /\(after moving x\)/)
  t.match(reasonOf(t, place(view, { type: 'drain', node: 'zz' })), /there is no node zz/)
})

t.test('resize: only growth, and only where both nodes have the space', async (t) => {
  const view = cluster({
    nodes: [node('a1', 'site-a', 100), node('b1', 'site-b', 30)],
    volumes: [volume('v', 20, ['a1', 'b1'])],
  })
  t.same(planOf(t, place(view, { type: 'resize', volume: 'v', sizeBytes: 30 * GiB })), {
    type: 'resize',
    volume: 'v',
    sizeBytes: 30 * GiB,
  })
  t.match(
    reasonOf(t, place(view, { type: 'resize', volume: 'v', sizeBytes: 31 * GiB })),
    /b1 holds a replica of v and has 10\.0 GiB free; growing to 31\.0 GiB needs 11\.0 GiB more there/,
  )
  t.match(
    reasonOf(t, place(view, { type: 'resize', volume: 'v', sizeBytes: 10 * GiB })),
    /volumes only grow/,
  )
  t.match(
    reasonOf(t, place(view, { type: 'resize', volume: 'w', sizeBytes: GiB })),
    /there is no volume w/,
  )
})

// Property tests: random small clusters, every request checked against a brute-force solver.

const unit = GiB

function randomView(rng: Prng): ClusterView {
  const dataDomains = 1 + rng.int(3)
  const domains: ClusterView['domains'] = [
    ...Array.from({ length: dataDomains }, (_, i) => ({ name: `d${i}`, kind: 'data' as const })),
    ...(rng.bool(0.9) ? [{ name: 'w', kind: 'witness' as const }] : []),
  ]
  const nodes: NodeView[] = []
  for (let d = 0; d < dataDomains; d++) {
    const count = rng.int(4)
    for (let n = 0; n < count; n++) {
      const state = rng.bool(0.8) ? 'active' : rng.bool() ? 'draining' : 'down'
      nodes.push({
        name: `d${d}n${n}`,
        domain: `d${d}`,
        capacityBytes: (4 + rng.int(20)) * unit,
        state,
      })
    }
  }
  // Volumes placed validly (different domains, within capacity), as the catalog keeps them.
  const view: ClusterView = { domains, nodes, volumes: [] }
  const volumes: VolumeView[] = []
  for (let i = 0, count = rng.int(7); i < count; i++) {
    const size = (1 + rng.int(8)) * unit
    const used = usedBytes({ ...view, volumes })
    const fits = nodes.filter((each) => each.capacityBytes - (used.get(each.name) ?? 0) >= size)
    const first = fits[rng.int(fits.length)]
    const second = fits.filter((each) => each.domain !== first?.domain)[rng.int(fits.length)]
    if (first !== undefined && second !== undefined) {
      volumes.push({ name: `v${i}`, sizeBytes: size, replicas: [first.name, second.name] })
    }
  }
  return { domains, nodes, volumes }
}

function randomRequest(rng: Prng, view: ClusterView): PlacementRequest {
  const someVolume = view.volumes[rng.int(view.volumes.length)]
  const someNode = view.nodes[rng.int(view.nodes.length)]
  const dataDomains = view.domains.filter((domain) => domain.kind === 'data')
  switch (rng.int(4)) {
    case 0:
      return {
        type: 'create',
        volume: 'new',
        sizeBytes: (1 + rng.int(16)) * unit,
        preferredDomain: rng.bool(0.3) ? dataDomains[rng.int(dataDomains.length)]?.name : undefined,
      }
    case 1:
      if (someVolume === undefined) return { type: 'drain', node: someNode?.name ?? 'none' }
      return {
        type: 'move',
        volume: someVolume.name,
        fromNode: someVolume.replicas[rng.int(2)] ?? '',
        toNode: rng.bool(0.3) ? someNode?.name : undefined,
      }
    case 2:
      return { type: 'drain', node: someNode?.name ?? 'none' }
    default:
      if (someVolume === undefined) return { type: 'create', volume: 'new', sizeBytes: unit }
      return {
        type: 'resize',
        volume: someVolume.name,
        sizeBytes: someVolume.sizeBytes + rng.int(12) * unit,
      }
  }
}

function free(view: ClusterView, used: Map<string, number>, name: string): number {
  const found = view.nodes.find((each) => each.name === name)
  return found === undefined ? 0 : found.capacityBytes - (used.get(name) ?? 0)
}

function nodeNamed(view: ClusterView, name: string): NodeView | undefined {
  return view.nodes.find((each) => each.name === name)
}

function isData(view: ClusterView, domain: string | undefined): boolean {
  return view.domains.some((each) => each.name === domain && each.kind === 'data')
}

/** Whether any valid plan exists for the request, by trying everything. */
function feasible(view: ClusterView, request: PlacementRequest): boolean {
  const used = usedBytes(view)
  const active = view.nodes.filter((each) => each.state === 'active')
  switch (request.type) {
    case 'create': {
      if (!view.domains.some((each) => each.kind === 'witness')) return false
      const fits = active.filter(
        (each) => isData(view, each.domain) && free(view, used, each.name) >= request.sizeBytes,
      )
      return fits.some((x) =>
        fits.some(
          (y) =>
            x.domain !== y.domain &&
            (request.preferredDomain === undefined || x.domain === request.preferredDomain),
        ),
      )
    }
    case 'move': {
      const volume = view.volumes.find((each) => each.name === request.volume)
      const from = nodeNamed(view, request.fromNode)
      if (volume === undefined || from === undefined || !volume.replicas.includes(from.name))
        return false
      return active.some(
        (each) =>
          each.domain === from.domain &&
          !volume.replicas.includes(each.name) &&
          (request.toNode === undefined || each.name === request.toNode) &&
          free(view, used, each.name) >= volume.sizeBytes,
      )
    }
    case 'drain': {
      const from = nodeNamed(view, request.node)
      if (from === undefined) return false
      const volumes = view.volumes.filter((each) => each.replicas.includes(from.name))
      const targets = active.filter(
        (each) => each.domain === from.domain && each.name !== from.name,
      )
      const tryAll = (index: number): boolean => {
        const volume = volumes[index]
        if (volume === undefined) return true
        return targets.some((target) => {
          if (
            volume.replicas.includes(target.name) ||
            free(view, used, target.name) < volume.sizeBytes
          )
            return false
          used.set(target.name, (used.get(target.name) ?? 0) + volume.sizeBytes)
          const ok = tryAll(index + 1)
          used.set(target.name, (used.get(target.name) ?? 0) - volume.sizeBytes)
          return ok
        })
      }
      return tryAll(0)
    }
    case 'resize': {
      const volume = view.volumes.find((each) => each.name === request.volume)
      if (volume === undefined || request.sizeBytes < volume.sizeBytes) return false
      const growth = request.sizeBytes - volume.sizeBytes
      return volume.replicas.every((name) => free(view, used, name) >= growth)
    }
  }
}

/** The view after the plan ran: every rule must still hold in it. */
function apply(view: ClusterView, plan: Plan, request: PlacementRequest): ClusterView {
  switch (plan.type) {
    case 'create':
      return {
        ...view,
        volumes: [
          ...view.volumes,
          {
            name: plan.volume,
            sizeBytes: request.type === 'create' ? request.sizeBytes : 0,
            replicas: plan.replicas,
          },
        ],
      }
    case 'moves':
      return {
        ...view,
        volumes: view.volumes.map((volume) => {
          const move = plan.moves.find((each) => each.volume === volume.name)
          if (move === undefined) return volume
          const replicas = volume.replicas.map((name) =>
            name === move.fromNode ? move.toNode : name,
          )
          return { ...volume, replicas: [replicas[0] ?? '', replicas[1] ?? ''] }
        }),
      }
    case 'resize':
      return {
        ...view,
        volumes: view.volumes.map((volume) =>
          volume.name === plan.volume ? { ...volume, sizeBytes: plan.sizeBytes } : volume,
        ),
      }
  }
}

/** Every rule the placed cluster must keep; empty when all hold. */
function violations(
  before: ClusterView,
  after: ClusterView,
  plan: Plan,
  request: PlacementRequest,
): string[] {
  const found: string[] = []
  const used = usedBytes(after)
  for (const each of after.nodes) {
    const beforeUsed = usedBytes(before).get(each.name) ?? 0
    const now = used.get(each.name) ?? 0
    if (now > each.capacityBytes && now > beforeUsed) found.push(`${each.name} over capacity`)
  }
  for (const volume of after.volumes) {
    const [x, y] = volume.replicas.map((name) => nodeNamed(after, name))
    if (x === undefined || y === undefined) found.push(`${volume.name} on an unknown node`)
    else if (x.domain === y.domain) found.push(`${volume.name} has both replicas in ${x.domain}`)
  }
  const received = (name: string): boolean => {
    const was = before.volumes.filter((volume) => volume.replicas.includes(name)).length
    const is = after.volumes.filter((volume) => volume.replicas.includes(name)).length
    return is > was
  }
  for (const each of after.nodes) {
    if (each.state !== 'active' && received(each.name))
      found.push(`${each.name} is ${each.state} and received a replica`)
  }
  if (plan.type === 'create') {
    const witness = before.domains.find((each) => each.name === plan.witnessDomain)
    if (witness?.kind !== 'witness')
      found.push(`witness domain ${plan.witnessDomain} is not a witness domain`)
    for (const name of plan.replicas) {
      if (!isData(before, nodeNamed(before, name)?.domain))
        found.push(`${name} is not in a data domain`)
    }
    if (request.type === 'create' && request.preferredDomain !== undefined) {
      if (nodeNamed(before, plan.replicas[0])?.domain !== request.preferredDomain)
        found.push('not in the preferred domain')
    }
  }
  if (plan.type === 'moves') {
    for (const move of plan.moves) {
      if (nodeNamed(before, move.fromNode)?.domain !== nodeNamed(before, move.toNode)?.domain) {
        found.push(`${move.volume} moved out of its domain`)
      }
    }
    if (
      request.type === 'drain' &&
      after.volumes.some((volume) => volume.replicas.includes(request.node))
    ) {
      found.push(`${request.node} still holds replicas after its drain`)
    }
  }
  return found
}

function shuffled<T>(rng: Prng, items: readonly T[]): T[] {
  const copy = [...items]
  for (let i = copy.length - 1; i > 0; i--) {
    const j = rng.int(i + 1)
    const swap = copy[i] as T
    copy[i] = copy[j] as T
    copy[j] = swap
  }
  return copy
}

t.test(
  'property: plans keep every rule, and a plan exists exactly when one is possible',
  async (t) => {
    const seed = testSeed()
    t.comment(`seed ${seed} (replay: DUPLEX_SEED=${seed} npx tap dist/test/unit/placement.test.js)`)
    const rng = new Prng(seed)
    const counts = { plans: 0, refusals: 0 }
    for (let round = 0; round < 3000; round++) {
      const view = randomView(rng)
      const request = randomRequest(rng, view)
      const result = place(view, request)
      const context = `seed ${seed} round ${round}: ${JSON.stringify({ view, request })}`
      if (result.ok !== feasible(view, request)) {
        t.fail(
          `${context}: placement says ${JSON.stringify(result)}, brute force says ${!result.ok}`,
        )
        return
      }
      if (!result.ok) {
        counts.refusals++
        if (result.reason.length === 0) t.fail(`${context}: a refusal without a reason`)
        continue
      }
      counts.plans++
      const broken = violations(view, apply(view, result.plan, request), result.plan, request)
      if (broken.length > 0) {
        t.fail(`${context}: ${broken.join('; ')}`)
        return
      }
      // Deterministic: the same cluster listed in another order gives the same plan.
      const reordered: ClusterView = {
        domains: shuffled(rng, view.domains),
        nodes: shuffled(rng, view.nodes),
        volumes: shuffled(rng, view.volumes),
      }
      const again = place(reordered, request)
      if (JSON.stringify(again) !== JSON.stringify(result)) {
        t.fail(`${context}: reordered view gives ${JSON.stringify(again)}`)
        return
      }
    }
    t.ok(
      counts.plans > 500 && counts.refusals > 500,
      `both outcomes exercised: ${JSON.stringify(counts)}`,
    )
  },
)

t.test('property: a new volume goes to the most free fitting node of each domain', async (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed}`)
  const rng = new Prng(seed)
  let placed = 0
  for (let round = 0; round < 2000; round++) {
    const view = randomView(rng)
    const sizeBytes = (1 + rng.int(8)) * unit
    const result = place(view, { type: 'create', volume: 'new', sizeBytes })
    if (!result.ok || result.plan.type !== 'create') continue
    placed++
    const used = usedBytes(view)
    for (const name of result.plan.replicas) {
      const chosen = nodeNamed(view, name)
      const better = view.nodes.find(
        (each) =>
          each.domain === chosen?.domain &&
          each.state === 'active' &&
          free(view, used, each.name) > free(view, used, name),
      )
      if (better !== undefined) {
        t.fail(
          `seed ${seed} round ${round}: ${name} chosen over ${better.name} with more free space`,
        )
        return
      }
    }
  }
  // The random clusters must actually place volumes for this to check anything.
  t.ok(placed > 300, `${placed} of 2000 rounds placed a volume, each on the most free nodes`)
})

t.test(
  'property: drain finds a plan whenever one exists, also where greedy gets stuck',
  async (t) => {
    // Tight packings: the volumes of the drained node just about fill the other nodes of its site.
    const seed = testSeed()
    t.comment(`seed ${seed}`)
    const rng = new Prng(seed)
    const counts = { plans: 0, refusals: 0 }
    for (let round = 0; round < 2000; round++) {
      const sizes = Array.from({ length: 2 + rng.int(4) }, () => 1 + rng.int(9))
      const total = sizes.reduce((sum, size) => sum + size, 0)
      const targets = 2 + rng.int(2)
      const nodes = [
        node('a0', 'site-a', total),
        ...Array.from({ length: targets }, (_, i) =>
          node(`a${i + 1}`, 'site-a', Math.ceil(total / targets) + rng.int(4) - 1),
        ),
        node('b0', 'site-b', total),
      ]
      const view = cluster({
        nodes,
        volumes: sizes.map((size, i) => volume(`v${i}`, size, ['a0', 'b0'])),
      })
      const request = { type: 'drain', node: 'a0' } as const
      const result = place(view, request)
      if (result.ok !== feasible(view, request)) {
        t.fail(`seed ${seed} round ${round}: ${JSON.stringify({ view, result })}`)
        return
      }
      if (result.ok) {
        counts.plans++
        const broken = violations(view, apply(view, result.plan, request), result.plan, request)
        if (broken.length > 0) t.fail(`seed ${seed} round ${round}: ${broken.join('; ')}`)
      } else counts.refusals++
    }
    t.ok(counts.plans > 100 && counts.refusals > 100, `both outcomes: ${JSON.stringify(counts)}`)
  },
)
