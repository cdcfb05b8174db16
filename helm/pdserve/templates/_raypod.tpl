{{/*
Pod template shared by the Ray head and the prefill/decode worker groups: one container, which KubeRay starts
`ray start` in. The router group's two-container pod is in _routerpod.tpl.
Args: (dict "root" $ "component" "ray-head"|"prefill"|"decode" "container" NAME "spec" GROUP-VALUES "ports" LIST)
*/}}
{{- define "pdserve.rayPodTemplate" -}}
{{- $root := .root }}
{{- $spec := .spec -}}
metadata:
  labels:
    {{- include "pdserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  enableServiceLinks: false
  {{- if $spec.drainTimeoutSeconds }}
  terminationGracePeriodSeconds: {{ add $spec.drainTimeoutSeconds 30 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.securityContext.pod | nindent 4 }}
  {{- with $root.Values.images.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "pdserve.image" (dict "root" $root "flavor" $spec.image) | quote }}
      imagePullPolicy: {{ $root.Values.images.pullPolicy }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        - name: HOME
          value: /tmp
        {{- include "pdserve.rayAuthEnv" $root | nindent 8 }}
        {{- with $spec.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $resources := deepCopy (default dict $spec.resources) }}
      {{- if gt (int (default 0 $spec.gpus)) 0 }}
      {{- $limits := merge (dict "nvidia.com/gpu" (int $spec.gpus)) (default dict $resources.limits) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      {{- if $spec.drainTimeoutSeconds }}
      lifecycle:
        preStop:
          # Workers on a draining node take no new requests; this returns once their requests are done.
          exec:
            command: ["pdserve", "drain-node", "--timeout-s", {{ $spec.drainTimeoutSeconds | quote }}]
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext.container | nindent 8 }}
      volumeMounts:
        {{- include "pdserve.scratchMounts" (dict "shm" $spec.shmSizeLimit) | nindent 8 }}
        {{- include "pdserve.rayTokenMount" $root | nindent 8 }}
        {{- include "pdserve.kvTokenMount" $root | nindent 8 }}
        {{- with include "pdserve.modelVolumeMount" $root }}{{ . | nindent 8 }}{{ end }}
  volumes:
    {{- include "pdserve.scratchVolumes" (dict "tmp" $spec.tmpSizeLimit "shm" $spec.shmSizeLimit) | nindent 4 }}
    {{- include "pdserve.rayTokenVolume" $root | nindent 4 }}
    {{- include "pdserve.kvTokenVolume" $root | nindent 4 }}
    {{- with include "pdserve.modelVolume" $root }}{{ . | nindent 4 }}{{ end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
