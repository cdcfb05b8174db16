{{/*
The router group's pod: two containers that share /tmp/ray.

  ray-worker  KubeRay's Ray container (it must come first): KubeRay runs `ray start --address=<head>:6379
              --num-cpus=0 --resources='{"router": 1}' ...` in it, a Ray node that takes no actors.
  router      `pdserve serve --ray-address auto`: a Ray driver on that node. "auto" reads the address that
              `ray start` writes to /tmp/ray/ray_current_cluster once the node is up, so the router waits
              for that file and then execs pdserve; it reaches the raylet through the sockets under
              /tmp/ray. No Ray Client: streaming actor methods need a real driver.
*/}}

{{/*
API keys and TLS (values auth and tls): the users' Secrets, mounted read-only in the router container and in the
`helm test` pod. With client certificates required, the probes and the test present the Secret's own tls.crt.
*/}}
{{- define "pdserve.apiKeysFile" -}}
/etc/pdserve/api-keys/api-keys
{{- end }}

{{- define "pdserve.tlsDir" -}}
/etc/pdserve/tls
{{- end }}

{{- define "pdserve.securityVolumes" -}}
{{- with .Values.auth.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . | quote }}
    defaultMode: 256   # 0400
    items:
      - key: api-keys
        path: api-keys
{{- end }}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . | quote }}
    defaultMode: 256   # 0400
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- if $.Values.tls.clientAuth }}
      - key: ca.crt
        path: ca.crt
      {{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.securityMounts" -}}
{{- if .Values.auth.apiKeys.existingSecret }}
- name: api-keys
  mountPath: {{ include "pdserve.apiKeysFile" . | dir }}
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: {{ include "pdserve.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The router's health probe: gRPC health, or HTTPS /health under TLS (the kubelet's gRPC probe has no TLS,
     and its HTTPS probe no client certificate: with clientAuth, wget presents the Secret's tls.crt). */}}
{{- define "pdserve.routerProbe" -}}
{{- if not .Values.tls.existingSecret }}
grpc:
  port: 50051
{{- else if not .Values.tls.clientAuth }}
httpGet:
  path: /health
  port: http
  scheme: HTTPS
{{- else }}
exec:
  command:
    - wget
    - --quiet
    - --output-document=/dev/null
    - --tries=1
    - --timeout=5
    - --no-hsts
    - --no-check-certificate
    - {{ printf "--certificate=%s/tls.crt" (include "pdserve.tlsDir" .) }}
    - {{ printf "--private-key=%s/tls.key" (include "pdserve.tlsDir" .) }}
    - https://127.0.0.1:8000/health
{{- end }}
{{- end }}

{{/* `pdserve serve` arguments, after the wait. */}}
{{- define "pdserve.routerArgs" -}}
- serve
- --model
- {{ include "pdserve.modelPath" . | quote }}
- --served-model-name
- {{ .Values.model.servedModelName | quote }}
- --mode
- {{ .Values.mode | quote }}
{{- if eq .Values.mode "disagg" }}
- --prefill-workers
- {{ include "pdserve.actorCount" (dict "root" $ "group" "prefill") | quote }}
{{- end }}
- --decode-workers
- {{ include "pdserve.actorCount" (dict "root" $ "group" "decode") | quote }}
- --host
- "0.0.0.0"
- --grpc-port
- "50051"
- --http-port
- "8000"
- --ray-address
- auto
- --worker-group-resources
- --slo-ttft-ms
- {{ int .Values.serving.slo.ttftMs | quote }}
- --slo-tpot-ms
- {{ int .Values.serving.slo.tpotMs | quote }}
- --transfer-timeout-s
- {{ .Values.serving.transfer.timeoutS | toString | quote }}
- --transfer-failure-policy
- {{ .Values.serving.transfer.failurePolicy | quote }}
- --kv-token-file
- {{ printf "%s/token" (include "pdserve.kvTokenDir" .) | quote }}
- --transfer-staging-mib
- {{ int .Values.serving.transfer.stagingMiB | quote }}
- --transfer-spin-us
- {{ int .Values.serving.transfer.spinUs | quote }}
{{- with .Values.serving.blockSize }}
- --block-size
- {{ int . | quote }}
{{- end }}
{{- with .Values.serving.kvCacheDtype }}
- --kv-cache-dtype
- {{ . | quote }}
{{- end }}
- --kv-cache-mb
- {{ int .Values.serving.kvCacheMiB | quote }}
{{- with .Values.serving.maxModelLen }}
- --max-model-len
- {{ int . | quote }}
{{- end }}
{{- with .Values.serving.dtype }}
- --dtype
- {{ . | quote }}
{{- end }}
- --max-queued-requests
- {{ int .Values.serving.maxQueuedRequests | quote }}
{{- with .Values.serving.requestTimeoutS }}
- --request-timeout-s
- {{ . | toString | quote }}
{{- end }}
- --migration-limit
- {{ int .Values.serving.migrationLimit | quote }}
- --device
- {{ if gt (int .Values.workers.decode.gpus) 0 }}"cuda"{{ else }}"cpu"{{ end }}
{{- if .Values.auth.apiKeys.existingSecret }}
- --api-key-file
- {{ include "pdserve.apiKeysFile" . | quote }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- --tls-cert
- {{ printf "%s/tls.crt" (include "pdserve.tlsDir" .) | quote }}
- --tls-key
- {{ printf "%s/tls.key" (include "pdserve.tlsDir" .) | quote }}
{{- if .Values.tls.clientAuth }}
- --tls-client-ca
- {{ printf "%s/ca.crt" (include "pdserve.tlsDir" .) | quote }}
{{- end }}
{{- end }}
{{- range .Values.router.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "pdserve.routerPodTemplate" -}}
{{- $router := .Values.router -}}
metadata:
  labels:
    {{- include "pdserve.labels" . | nindent 4 }}
    app.kubernetes.io/component: router
    {{- /* KubeRay sets these two itself; they are here too so that the selectors can be checked offline. */}}
    {{- include "pdserve.routerPodSelector" . | nindent 4 }}
    {{- with $router.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $router.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $router.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.securityContext.pod | nindent 4 }}
  {{- with .Values.images.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-worker
      image: {{ include "pdserve.image" (dict "root" $ "flavor" $router.image) | quote }}
      imagePullPolicy: {{ .Values.images.pullPolicy }}
      ports:
        - name: metrics
          containerPort: 8080
      env:
        - name: HOME
          value: /tmp
        {{- include "pdserve.rayAuthEnv" . | nindent 8 }}
      resources:
        {{- toYaml $router.ray.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext.container | nindent 8 }}
      volumeMounts:
        {{- include "pdserve.scratchMounts" (dict "shm" $router.ray.shmSizeLimit) | nindent 8 }}
        - name: ray-session
          mountPath: /tmp/ray
        {{- include "pdserve.rayTokenMount" . | nindent 8 }}
        {{- include "pdserve.kvTokenMount" . | nindent 8 }}
    - name: router
      image: {{ include "pdserve.image" (dict "root" $ "flavor" $router.image) | quote }}
      imagePullPolicy: {{ .Values.images.pullPolicy }}
      command:
        - /bin/sh
        - -c
        - until [ -s /tmp/ray/ray_current_cluster ]; do sleep 1; done; exec pdserve "$@"
        - pdserve
      args:
        {{- include "pdserve.routerArgs" . | nindent 8 }}
      ports:
        - name: grpc
          containerPort: 50051
          protocol: TCP
        - name: http
          containerPort: 8000
          protocol: TCP
      env:
        - name: HOME
          value: /tmp
        {{- include "pdserve.rayAuthEnv" . | nindent 8 }}
        {{- with $router.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        {{- include "pdserve.routerProbe" . | trim | nindent 8 }}
        periodSeconds: {{ $router.probes.startup.periodSeconds }}
        failureThreshold: {{ $router.probes.startup.failureThreshold }}
      readinessProbe:
        {{- include "pdserve.routerProbe" . | trim | nindent 8 }}
        periodSeconds: {{ $router.probes.readiness.periodSeconds }}
        failureThreshold: {{ $router.probes.readiness.failureThreshold }}
      livenessProbe:
        {{- include "pdserve.routerProbe" . | trim | nindent 8 }}
        periodSeconds: {{ $router.probes.liveness.periodSeconds }}
        failureThreshold: {{ $router.probes.liveness.failureThreshold }}
      resources:
        {{- toYaml $router.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext.container | nindent 8 }}
      volumeMounts:
        {{- include "pdserve.scratchMounts" (dict "shm" $router.ray.shmSizeLimit) | nindent 8 }}
        - name: ray-session
          mountPath: /tmp/ray
        {{- include "pdserve.rayTokenMount" . | nindent 8 }}
        {{- include "pdserve.kvTokenMount" . | nindent 8 }}
        {{- with include "pdserve.modelVolumeMount" . }}{{ . | nindent 8 }}{{ end }}
        {{- with include "pdserve.securityMounts" . }}{{ . | trim | nindent 8 }}{{ end }}
  volumes:
    {{- include "pdserve.scratchVolumes" (dict "tmp" $router.tmpSizeLimit "shm" $router.ray.shmSizeLimit) | nindent 4 }}
    - name: ray-session
      emptyDir:
        sizeLimit: {{ $router.tmpSizeLimit | quote }}
    {{- include "pdserve.rayTokenVolume" . | nindent 4 }}
    {{- include "pdserve.kvTokenVolume" . | nindent 4 }}
    {{- with include "pdserve.modelVolume" . }}{{ . | nindent 4 }}{{ end }}
    {{- with include "pdserve.securityVolumes" . }}{{ . | trim | nindent 4 }}{{ end }}
  {{- with $router.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $router.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $router.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
