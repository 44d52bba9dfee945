// The service map: workloads, reserved identities and learned names as
// boxes, one arrow per (source, destination, port, protocol) coloured by
// verdict and labelled with its policy. Laid out by a force simulation
// that keeps each namespace together; zoom and pan with the mouse.
import { useEffect, useRef, useState } from "preact/hooks";
import {
  forceCollide,
  forceLink,
  forceManyBody,
  forceSimulation,
  forceX,
  forceY,
  type Simulation,
  type SimulationLinkDatum,
  type SimulationNodeDatum,
} from "d3-force";
import { select } from "d3-selection";
import { zoom, zoomIdentity, type ZoomTransform } from "d3-zoom";
import type { MapEdge, MapNode, Snapshot } from "./api";

interface SimNode extends SimulationNodeDatum {
  id: string;
  data: MapNode;
}

type SimLink = SimulationLinkDatum<SimNode> & { id: string };

const NODE_W = 150;
const NODE_H = 44;

export function edgePolicyText(e: MapEdge): string {
  const parts: string[] = [];
  if (e.denied_by.length) parts.push("denied by " + e.denied_by.join(", "));
  if (e.default_deny_by) {
    parts.push(
      e.default_deny_by.length ? "default deny, selected by " + e.default_deny_by.join(", ") : "default deny",
    );
  }
  if (e.allowed_by.length) parts.push("allowed by " + e.allowed_by.join(", "));
  return parts.join("; ");
}

function groupOf(n: MapNode): string {
  return n.namespace || "(outside the cluster)";
}

// Where each namespace's boxes gather: on a circle, one place each.
function groupCentres(groups: string[]): Map<string, [number, number]> {
  const out = new Map<string, [number, number]>();
  const r = groups.length > 1 ? 220 + 60 * groups.length : 0;
  groups.forEach((g, i) => {
    const a = (2 * Math.PI * i) / groups.length;
    out.set(g, [r * Math.cos(a), r * Math.sin(a)]);
  });
  return out;
}

export function ServiceMap(props: {
  snapshot: Snapshot | null;
  grouped: boolean;
  selected: string | null;
  onSelect: (edgeId: string | null) => void;
}) {
  const svgRef = useRef<SVGSVGElement>(null);
  const sim = useRef<Simulation<SimNode, SimLink> | null>(null);
  const nodes = useRef(new Map<string, SimNode>());
  const [, setFrame] = useState(0);
  const [transform, setTransform] = useState<ZoomTransform>(zoomIdentity);
  const topology = useRef("");

  useEffect(() => {
    const svg = svgRef.current;
    if (!svg) return;
    const z = zoom<SVGSVGElement, unknown>()
      .scaleExtent([0.1, 4])
      .on("zoom", (ev: { transform: ZoomTransform }) => setTransform(ev.transform));
    const s = select(svg);
    s.call(z);
    const r = svg.getBoundingClientRect();
    s.call(z.transform, zoomIdentity.translate(r.width / 2, r.height / 2));
    return () => {
      s.on(".zoom", null);
    };
  }, []);

  const snap = props.snapshot;
  useEffect(() => {
    if (!snap) return;
    const groups = [...new Set(snap.nodes.map(groupOf))].sort();
    const centres = groupCentres(props.grouped ? groups : []);
    const keep = new Map<string, SimNode>();
    for (const n of snap.nodes) {
      let s = nodes.current.get(n.id);
      if (!s) {
        const [cx, cy] = centres.get(groupOf(n)) ?? [0, 0];
        s = { id: n.id, data: n, x: cx + (Math.random() - 0.5) * 80, y: cy + (Math.random() - 0.5) * 80 };
      }
      s.data = n;
      keep.set(n.id, s);
    }
    nodes.current = keep;
    const links: SimLink[] = snap.edges
      .filter((e) => keep.has(e.source) && keep.has(e.target) && e.source !== e.target)
      .map((e) => ({ id: e.id, source: e.source, target: e.target }));
    const shape = [...keep.keys()].join("|") + "#" + links.map((l) => l.id).join("|") + "#" + props.grouped;
    if (shape === topology.current && sim.current) return;
    topology.current = shape;
    sim.current?.stop();
    const list = [...keep.values()];
    const s = forceSimulation<SimNode, SimLink>(list)
      .force("link", forceLink<SimNode, SimLink>(links).id((d) => d.id).distance(330).strength(0.3))
      .force("charge", forceManyBody<SimNode>().strength(-1400))
      .force("collide", forceCollide<SimNode>(NODE_W * 0.8))
      .force("x", forceX<SimNode>((d) => (centres.get(groupOf(d.data)) ?? [0, 0])[0]).strength(props.grouped ? 0.12 : 0.03))
      .force("y", forceY<SimNode>((d) => (centres.get(groupOf(d.data)) ?? [0, 0])[1]).strength(props.grouped ? 0.12 : 0.03))
      .alpha(0.8)
      .on("tick", () => setFrame((f) => f + 1));
    sim.current = s;
  }, [snap, props.grouped]);

  useEffect(() => () => sim.current?.stop(), []);

  const pos = (id: string): [number, number] => {
    const n = nodes.current.get(id);
    return [n?.x ?? 0, n?.y ?? 0];
  };
  const edges = snap?.edges ?? [];
  // Parallel arrows (several ports between two boxes) bend apart.
  const pairIndex = new Map<string, number>();
  const bends = edges.map((e) => {
    const key = [e.source, e.target].sort().join("~");
    const i = pairIndex.get(key) ?? 0;
    pairIndex.set(key, i + 1);
    return i;
  });
  const groups = props.grouped ? [...new Set((snap?.nodes ?? []).map(groupOf))].sort() : [];
  const geometry = edges.map((e, i) => {
    const [x1, y1] = pos(e.source);
    const [x2, y2] = pos(e.target);
    const dx = x2 - x1, dy = y2 - y1;
    const len = Math.hypot(dx, dy) || 1;
    // Stop at the target box's border.
    const t = Math.min(
      Math.abs(dx) > 0 ? (NODE_W / 2 + 4) / Math.abs(dx) : Infinity,
      Math.abs(dy) > 0 ? (NODE_H / 2 + 4) / Math.abs(dy) : Infinity,
    );
    const ex = x2 - dx * Math.min(t, 0.5), ey = y2 - dy * Math.min(t, 0.5);
    const bend = (bends[i] % 2 ? -1 : 1) * Math.ceil(bends[i] / 2) * 36;
    const mx = (x1 + ex) / 2 - (dy / len) * bend, my = (y1 + ey) / 2 + (dx / len) * bend;
    const path = e.source === e.target
      ? `M ${x1} ${y1 - NODE_H / 2} c 60 -70 110 0 ${NODE_W / 2} ${NODE_H / 2}`
      : `M ${x1} ${y1} Q ${mx} ${my} ${ex} ${ey}`;
    const total = e.counts.forwarded + e.counts.dropped + e.counts.audit + e.counts.error;
    const l7 = [...Object.keys(e.http_methods), ...Object.keys(e.http_status), ...e.dns_names.slice(0, 2)].join(" ");
    return { e, path, mx, my, total, policy: edgePolicyText(e), l7 };
  });

  return (
    <svg ref={svgRef} class="map" data-testid="service-map" onClick={(ev) => {
      if ((ev.target as Element).tagName === "svg") props.onSelect(null);
    }}>
      <defs>
        {["forwarded", "dropped", "audit", "error", "mixed"].map((v) => (
          <marker id={`arrow-${v}`} viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
            <path d="M 0 0 L 10 5 L 0 10 z" class={`arrowhead ${v}`} />
          </marker>
        ))}
      </defs>
      <g transform={transform.toString()}>
        {groups.map((g) => {
          const members = [...nodes.current.values()].filter((n) => groupOf(n.data) === g);
          if (!members.length) return null;
          const xs = members.map((n) => n.x ?? 0);
          const ys = members.map((n) => n.y ?? 0);
          const x0 = Math.min(...xs) - NODE_W / 2 - 16;
          const y0 = Math.min(...ys) - NODE_H / 2 - 30;
          const x1 = Math.max(...xs) + NODE_W / 2 + 16;
          const y1 = Math.max(...ys) + NODE_H / 2 + 16;
          return (
            <g class="group" data-namespace={g}>
              <rect x={x0} y={y0} width={x1 - x0} height={y1 - y0} rx="10" />
              <text x={x0 + 10} y={y0 + 18}>{g}</text>
            </g>
          );
        })}
        {geometry.map(({ e, path, mx, my, total, policy }) => (
          <g
            class={`edge ${e.verdict}${props.selected === e.id ? " selected" : ""}`}
            data-testid="edge"
            data-source={e.source}
            data-target={e.target}
            data-verdict={e.verdict}
            data-policy={policy}
            onClick={(ev) => {
              ev.stopPropagation();
              props.onSelect(e.id);
            }}
          >
            <title>{`${e.source} → ${e.target} ${e.port}/${e.protocol}: ${total} flows; ${policy}`}</title>
            <path d={path} marker-end={`url(#arrow-${e.verdict})`} />
          </g>
        ))}
        {[...nodes.current.values()].map((n) => (
          <g class={`node ${n.data.kind}`} data-testid="node" data-id={n.id} transform={`translate(${(n.x ?? 0) - NODE_W / 2},${(n.y ?? 0) - NODE_H / 2})`}>
            <title>{[n.id, `identity ${n.data.identity}`, ...n.data.labels].join("\n")}</title>
            <rect width={NODE_W} height={NODE_H} rx="8" />
            <text x={NODE_W / 2} y="19" class="node-label">{n.data.label.length > 22 ? n.data.label.slice(0, 21) + "…" : n.data.label}</text>
            <text x={NODE_W / 2} y="34" class="node-kind">{n.data.namespace || n.data.kind}</text>
          </g>
        ))}
        {/* Labels above the boxes: an arrow's words are never hidden. */}
        {geometry.map(({ e, mx, my, total, policy, l7 }) => (
          <g class={`edge-text ${e.verdict}`} onClick={() => props.onSelect(e.id)}>
            <text x={mx} y={my - 6} class="edge-label">{`${e.port ? e.port + "/" : ""}${e.protocol} · ${total}${l7 ? " · " + l7 : ""}`}</text>
            {policy ? <text x={mx} y={my + 10} class="edge-policy">{policy}</text> : null}
          </g>
        ))}
      </g>
    </svg>
  );
}
