import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

export interface Series {
  label: string;
  color: string;
  points: { x: number; y: number }[];
  /** SVG stroke-dasharray, e.g. '6 4' */
  dash?: string;
  /** Draw the points as circles instead of a line (a single figure rather than a series). */
  marker?: boolean;
}

export interface PlotOptions {
  /** Fixed y range; what lies outside is clipped (a zoomed panel). Default: the data's range. */
  yRange?: [number, number];
}

/**
 * A line chart as SVG, rendered to PNG with rsvg-convert (Debian's librsvg2-bin): no browser, no
 * native canvas module, and the SVG stays beside the PNG for review.
 */
export function writeLinePlot(file: string, title: string, xLabel: string, yLabel: string, series: Series[], options: PlotOptions = {}): void {
  const width = 960;
  const height = 540;
  const margin = { left: 80, right: 200, top: 50, bottom: 60 };
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p.x);
  const ys = all.map((p) => p.y);
  const [xMin, xMax] = [Math.min(...xs, 0), Math.max(...xs, 1)];
  let [yMin, yMax] = [Math.min(...ys, 0), Math.max(...ys, 0)];
  if (yMax - yMin < 1) [yMin, yMax] = [yMin - 0.5, yMax + 0.5];
  if (options.yRange) [yMin, yMax] = options.yRange;
  const px = (x: number) => margin.left + ((x - xMin) / (xMax - xMin)) * (width - margin.left - margin.right);
  const py = (y: number) => height - margin.bottom - ((y - yMin) / (yMax - yMin)) * (height - margin.top - margin.bottom);
  const ticks = (min: number, max: number, n = 6) => Array.from({ length: n + 1 }, (_, i) => min + ((max - min) * i) / n);
  const esc = (t: string) => t.replace(/[<>&]/g, (c) => `&#${c.charCodeAt(0)};`);
  const svg = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="DejaVu Sans, sans-serif" font-size="13">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    // lines beyond a fixed y range stop at the plot's edge instead of crossing the legend
    `<clipPath id="plot-area"><rect x="${margin.left}" y="${margin.top}" width="${width - margin.left - margin.right}" height="${height - margin.top - margin.bottom}"/></clipPath>`,
    `<text x="${width / 2}" y="28" text-anchor="middle" font-size="17">${esc(title)}</text>`,
    ...ticks(yMin, yMax).map(
      (y) => `<line x1="${margin.left}" x2="${width - margin.right}" y1="${py(y)}" y2="${py(y)}" stroke="#ddd"/>` +
        `<text x="${margin.left - 8}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(Math.abs(yMax - yMin) <= 10 ? 2 : 0)}</text>`,
    ),
    ...ticks(xMin, xMax).map((x) => `<text x="${px(x)}" y="${height - margin.bottom + 20}" text-anchor="middle">${Math.round(x)}</text>`),
    `<line x1="${margin.left}" x2="${width - margin.right}" y1="${py(0)}" y2="${py(0)}" stroke="#888"/>`,
    `<text x="${(margin.left + width - margin.right) / 2}" y="${height - 15}" text-anchor="middle">${esc(xLabel)}</text>`,
    `<text transform="translate(20 ${height / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel)}</text>`,
    ...series.map((s) =>
      s.marker
        ? s.points.map((p) => `<circle cx="${px(p.x).toFixed(1)}" cy="${py(p.y).toFixed(1)}" r="5" fill="${s.color}"/>`).join('\n')
        : `<polyline clip-path="url(#plot-area)" fill="none" stroke="${s.color}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ''} points="${s.points.map((p) => `${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join(' ')}"/>`,
    ),
    ...series.map(
      (s, i) =>
        (s.marker
          ? `<circle cx="${width - margin.right + 27}" cy="${margin.top + i * 24 + 2}" r="5" fill="${s.color}"/>`
          : `<line x1="${width - margin.right + 20}" x2="${width - margin.right + 34}" y1="${margin.top + i * 24 + 2}" y2="${margin.top + i * 24 + 2}" stroke="${s.color}" stroke-width="4"${s.dash ? ' stroke-dasharray="4 2"' : ''}/>`) +
        `<text x="${width - margin.right + 40}" y="${margin.top + i * 24 + 6}">${esc(s.label)}</text>`,
    ),
    '</svg>',
  ].join('\n');
  const svgFile = file.replace(/\.png$/, '.svg');
  fs.writeFileSync(svgFile, svg);
  execFileSync('rsvg-convert', ['-o', file, svgFile], { timeout: 30_000 });
}
